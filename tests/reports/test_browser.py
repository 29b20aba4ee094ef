"""Self-test of tests/browser.py: headless Chromium sees loaded and broken images and console errors."""

from __future__ import annotations

import base64
import struct
import zlib

import pytest
from browser import BrowserError, check_page, find_chromium

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="Chromium not found (.ci/run installs it; locally: apt-get install chromium, or set $CHROMIUM)",
)


def _png(width: int = 4, height: int = 3) -> bytes:
    """A valid RGB PNG, solid red."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + b"\xff\x00\x00" * width for _ in range(height))  # filter byte 0, then pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_good_page_has_loaded_image_and_no_errors(tmp_path):
    src = "data:image/png;base64," + base64.b64encode(_png()).decode()
    page = tmp_path / "good.html"
    page.write_text(
        f"<!doctype html><title>Good</title><img alt=chart src='{src}'><script>console.log('ok')</script>"
    )

    result = check_page(page, timeout=30)

    assert result.title == "Good"
    assert result.images == result.images_loaded == 1
    assert result.broken_images == []
    assert result.console_errors == []


def test_bad_page_reports_broken_image_console_error_and_exception(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text(
        "<!doctype html><title>Bad</title><img src='data:image/png;base64,AAAA'>"
        "<script>console.error('boom'); throw new Error('kaboom');</script>"
    )

    result = check_page(page, timeout=30)

    assert result.images == 1 and result.images_loaded == 0
    assert result.broken_images == ["data:image/png;base64,AAAA"]
    assert any("boom" in e for e in result.console_errors), result.console_errors
    assert any("kaboom" in e for e in result.console_errors), result.console_errors


def test_missing_file_raises(tmp_path):
    with pytest.raises(BrowserError, match="ERR_FILE_NOT_FOUND"):
        check_page(tmp_path / "absent.html", timeout=30)
