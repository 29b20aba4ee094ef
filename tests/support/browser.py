"""Open an HTML file in headless Chromium and report broken images and console errors (stdlib only).

Tests use this to check generated self-contained reports the way a reader sees them:

    from browser import check_page, find_chromium   # tests/support is on sys.path under pytest (conftest)
    if find_chromium() is None: pytest.skip(...)
    result = check_page("report.html")
    assert result.broken_images == [] and result.console_errors == []

Chromium is driven over the DevTools protocol on ``--remote-debugging-pipe``: the browser reads commands
from its fd 3 and writes replies and events to its fd 4, each message JSON terminated by a NUL byte. No
websocket, no port, no third-party package. Every wait is bounded by the caller's timeout (poll on the
pipe), and the browser process is always killed at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BrowserError", "PageCheck", "check_page", "find_chromium"]

# Names on PATH, then fixed locations (Debian/Ubuntu packages, Google Chrome), in order of preference. The
# headless shell comes first: built for this, it starts in about half the time of full Chromium.
_NAMES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_PATHS = (
    "/usr/lib/chromium/chromium-headless-shell",
    "/usr/lib/chromium-headless-shell/chromium-headless-shell",
    "/usr/lib/chromium/chromium",
    "/usr/lib/chromium-browser/chromium-browser",
    "/opt/google/chrome/chrome",
)

_FLAGS = (
    "--headless",  # new headless; chromium-headless-shell is always headless and accepts the flag
    "--no-sandbox",  # CI runs as root, where the sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",  # containers often have a 64 MB /dev/shm
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    "--remote-debugging-pipe",
)

# Runs in the page after the load event; returns plain JSON (returnByValue).
_COLLECT_JS = """(() => ({
  title: document.title,
  images: Array.from(document.images, (img) => ({
    src: img.currentSrc || img.src || img.getAttribute("src") || "",
    complete: img.complete,
    naturalWidth: img.naturalWidth,
  })),
  headings: Array.from(document.querySelectorAll("h2"), (h) => h.textContent.trim()),
  verdictTop: (() => { const v = document.getElementById("verdict"); return v ? v.getBoundingClientRect().top : null; })(),
  viewportHeight: window.innerHeight,
}))()"""


class BrowserError(RuntimeError):
    """Chromium failed to start, answered a command with an error, or did not answer in time."""


@dataclass
class PageCheck:
    images: int
    images_loaded: int
    # src (first 80 characters) of each image with complete == false or naturalWidth == 0
    broken_images: list[str] = field(default_factory=list)
    # uncaught exceptions, console.error / console.assert, error log entries (failed resource loads)
    console_errors: list[str] = field(default_factory=list)
    title: str = ""
    headings: list[str] = field(default_factory=list)  # the h2 texts in document order
    verdict_top: float | None = None  # pixels from the top of the page to the element with id="verdict"
    viewport_height: float = 0.0

    @property
    def verdict_first(self) -> bool:
        """The page's first section is its verdict, and it starts within the first screen."""
        return bool(self.headings) and "verdict" in self.headings[0].lower() and self.verdict_top is not None \
            and self.verdict_top < self.viewport_height


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable: $CHROMIUM if set, else the first found on PATH or in known places."""
    override = os.environ.get("CHROMIUM")
    if override:
        return shutil.which(override)
    for name in _NAMES:
        found = shutil.which(name)
        if found:
            return found
    for path in _PATHS:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def check_page(html_path: str | Path, timeout: float = 30.0) -> PageCheck:
    """Load ``html_path`` in headless Chromium; count images that loaded and collect console errors.

    Raises BrowserError if Chromium is missing, fails, or the whole check takes longer than ``timeout`` seconds.
    """
    binary = find_chromium()
    if binary is None:
        raise BrowserError("no Chromium found (install chromium or set $CHROMIUM)")
    url = Path(html_path).resolve().as_uri()
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="fincast-chromium-", ignore_cleanup_errors=True) as tmp:
        log_path = Path(tmp) / "stderr.log"
        with open(log_path, "wb") as log:
            session = _Session(binary, Path(tmp) / "profile", log, log_path, deadline)
            try:
                return session.check(url)
            finally:
                session.shutdown()


class _Session:
    """One Chromium process and its DevTools pipe."""

    def __init__(self, binary: str, profile: Path, log: Any, log_path: Path, deadline: float) -> None:
        self.deadline = deadline
        self.log_path = log_path
        self.next_id = 0
        self.buffer = b""
        self.events: list[dict[str, Any]] = []
        # Parent -> child (the child's fd 3) and child -> parent (its fd 4). The child's ends are first moved to
        # fds >= 10 so that mapping them onto 3 and 4 can never overwrite one with the other.
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        child_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(res_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(cmd_r)
        os.close(res_w)
        self.write_fd, self.read_fd = cmd_w, res_r
        try:
            self.proc = _Process(
                [binary, *_FLAGS, f"--user-data-dir={profile}", "about:blank"], log.fileno(), child_r, child_w
            )
        except BaseException:
            os.close(cmd_w)
            os.close(res_r)
            raise
        finally:
            os.close(child_r)
            os.close(child_w)

    # -- protocol -------------------------------------------------------------------------------------------

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise BrowserError(f"Chromium did not finish in time{self._stderr_tail()}")
        return left

    def _stderr_tail(self) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""
        return f"\nChromium stderr:\n{tail}" if tail else ""

    def send(self, method: str, params: dict[str, Any] | None = None, session_id: str | None = None) -> int:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        data = json.dumps(message).encode() + b"\0"
        while data:
            _, writable, _ = select.select([], [self.write_fd], [], self._remaining())
            if writable:
                try:
                    data = data[os.write(self.write_fd, data) :]
                except BrokenPipeError:
                    raise BrowserError(f"Chromium closed its pipe{self._stderr_tail()}") from None
        return self.next_id

    def receive(self) -> dict[str, Any]:
        """Next message from the browser (reply or event), waiting at most until the deadline."""
        while b"\0" not in self.buffer:
            readable, _, _ = select.select([self.read_fd], [], [], self._remaining())
            if readable:
                chunk = os.read(self.read_fd, 1 << 16)
                if not chunk:
                    code = self.proc.poll()
                    raise BrowserError(f"Chromium exited (code {code}){self._stderr_tail()}")
                self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None, session_id: str | None = None) -> dict:
        """Send a command and return its result; events that arrive meanwhile are kept in self.events."""
        wanted = self.send(method, params, session_id)
        while True:
            message = self.receive()
            if message.get("id") == wanted:
                if "error" in message:
                    raise BrowserError(f"{method} failed: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for_event(self, method: str, session_id: str) -> dict[str, Any]:
        for i, event in enumerate(self.events):
            if event["method"] == method and event.get("sessionId") == session_id:
                return self.events.pop(i)
        while True:
            message = self.receive()
            if message.get("method") == method and message.get("sessionId") == session_id:
                return message
            if "method" in message:
                self.events.append(message)

    # -- the check ------------------------------------------------------------------------------------------

    def check(self, url: str) -> PageCheck:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session_id=sid)
        self.events.clear()  # anything from about:blank
        nav = self.call("Page.navigate", {"url": url}, session_id=sid)
        if nav.get("errorText"):
            raise BrowserError(f"cannot open {url}: {nav['errorText']}")
        self.wait_for_event("Page.loadEventFired", sid)
        result = self.call(
            "Runtime.evaluate", {"expression": _COLLECT_JS, "returnByValue": True}, session_id=sid
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"collecting image states failed: {result['exceptionDetails']}")
        state = result["result"]["value"]
        broken = [
            img["src"][:80] for img in state["images"] if not img["complete"] or img["naturalWidth"] == 0
        ]
        errors = [
            text for event in self.events if event.get("sessionId") == sid for text in _error_texts(event)
        ]
        return PageCheck(
            images=len(state["images"]),
            images_loaded=len(state["images"]) - len(broken),
            broken_images=broken,
            console_errors=errors,
            title=state["title"],
            headings=state["headings"],
            verdict_top=state["verdictTop"],
            viewport_height=state["viewportHeight"],
        )

    def shutdown(self) -> None:
        """Browser.close (if time is left, waiting at most 5 s), then kill whatever is still running."""
        try:
            left = self.deadline - time.monotonic()
            if self.proc.poll() is None and left > 0:
                self.deadline = time.monotonic() + min(5.0, left)
                self.send("Browser.close")
                self.proc.wait(timeout=max(0.01, self.deadline - time.monotonic()))
        except (BrowserError, OSError):
            pass
        finally:
            # The browser's process group: the browser and any renderer/zygote left behind.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            if self.proc.returncode is None:
                self.proc.wait()
            os.close(self.write_fd)
            os.close(self.read_fd)


def _error_texts(event: dict[str, Any]) -> list[str]:
    """Error messages in one DevTools event: uncaught exceptions, console.error/assert, error log entries."""
    method, params = event["method"], event.get("params", {})
    if method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        description = details.get("exception", {}).get("description", "")
        text = details.get("text", "Uncaught")
        first_line = description.splitlines()[0] if description else ""
        return [f"{text} {first_line}".strip()]
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        args = [_remote_object_text(arg) for arg in params.get("args", [])]
        prefix = "console.assert: " if params["type"] == "assert" else ""
        return [prefix + " ".join(args)]
    if method == "Log.entryAdded":
        entry = params.get("entry", {})
        if entry.get("level") == "error":
            where = f" ({entry['url']})" if entry.get("url") else ""
            return [f"{entry.get('text', '')}{where}"]
    return []


def _remote_object_text(obj: dict[str, Any]) -> str:
    if "value" in obj:
        value = obj["value"]
        return value if isinstance(value, str) else json.dumps(value)
    return str(obj.get("description", obj.get("unserializableValue", obj.get("type", ""))))


class _Process:
    """A child process whose fds 3 and 4 are given pipe ends.

    os.posix_spawn rather than subprocess: subprocess can keep fds only under their own numbers (pass_fds),
    and remapping them in a preexec_fn breaks when the parent has no fd 3 or 4 open (EBADF) or when
    subprocess's own error pipe lands there. Spawn file actions do the dup2s in the child, in order;
    everything else the parent holds is close-on-exec (PEP 446).
    """

    def __init__(self, argv: list[str], log_fd: int, fd3: int, fd4: int) -> None:
        self.returncode: int | None = None
        self.pid = os.posix_spawn(
            argv[0],
            argv,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
                (os.POSIX_SPAWN_DUP2, fd3, 3),
                (os.POSIX_SPAWN_DUP2, fd4, 4),
            ],
            setsid=True,  # own process group: killed as a whole; Ctrl-C in the test run does not reach it
            setsigdef=(signal.SIGPIPE,),  # Python ignores SIGPIPE, and exec would pass that on
        )

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Exit code; raises TimeoutError if still running after ``timeout`` seconds."""
        if timeout is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode
        end = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= end:
                raise TimeoutError(f"process {self.pid} still running after {timeout} s")
            time.sleep(0.01)
        return self.returncode
