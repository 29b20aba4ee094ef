"""runs.preflight: every place a run writes is checked before its work, and a place it cannot write is named
with what it is for. Paths under a regular file cannot be created by anyone, root included; the permission
variants (a read-only folder or file) only bind a user other than root, so they skip as root."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from fincast import config as config_mod
from fincast.runs import driver, preflight

ROOT = Path(__file__).resolve().parents[2]
AS_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only folders and files anyway")


def _cfg(tmp_path: Path, *extra: str):
    return config_mod.load(ROOT / "pipelines" / "price_crypto.yaml", [
        f"tracking.uri=sqlite:///{tmp_path / 'store' / 'mlflow.db'}", f"tracking.artifact_dir={tmp_path / 'art'}",
        f"train.checkpoint_dir={tmp_path / 'ck'}", *extra])


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_missing_folders_that_can_be_created_pass_and_nothing_is_left_behind(tmp_path):
    (tmp_path / "art").mkdir()
    before = _listing(tmp_path)
    driver.check_outputs([_cfg(tmp_path)], reports=[("a report folder", tmp_path / "r" / "deep" / "er")])
    assert _listing(tmp_path) == before  # nothing created: no store, no folder, no probe file


def test_each_place_is_named_with_what_it_is_for(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    cfg = config_mod.load(ROOT / "pipelines" / "price_crypto.yaml", [
        f"tracking.uri=sqlite:///{afile / 'mlflow.db'}", f"tracking.artifact_dir={afile / 'art'}",
        f"train.checkpoint_dir={tmp_path / 'ck' / 'x'}"])
    (tmp_path / "ck").write_text("")
    with pytest.raises(preflight.OutputError) as err:
        driver.check_outputs([cfg], reports=[("the sweep report folder", afile / "r")],
                             stores=[("sweep.storage", f"sqlite:///{tmp_path / 'optuna.db'}")])
    lines = str(err.value).splitlines()
    assert lines[0] == "outputs that cannot be written:"
    # the store's folder is a file: the database in it, the artifacts and the report under it say nothing new
    assert lines[1:3] == [
        f"  tracking.uri (the MLflow store's folder) {afile} is not writable: it is a file, not a folder",
        f"  train.checkpoint_dir (checkpoints) {tmp_path / 'ck' / 'x'} is not writable: it cannot be created: "
        f"{tmp_path / 'ck'} is a file, not a folder"]
    assert lines[3].startswith("  (checked before any work") and len(lines) == 4


def test_a_database_path_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / "db").mkdir()
    with pytest.raises(preflight.OutputError, match=r"tracking.uri \(the MLflow store's database\) .*db is not "
                                                    r"writable: it is a folder, not a file"):
        preflight.check_outputs([_cfg(tmp_path, f"tracking.uri=sqlite:///{tmp_path / 'db'}")])


def test_what_each_store_uri_writes_here(tmp_path):
    folder = "tracking.uri (the MLflow store's folder)"
    assert preflight.store_locations("tracking.uri", f"sqlite:///{tmp_path / 'm.db'}") == [
        (folder, tmp_path, "dir"), ("tracking.uri (the MLflow store's database)", tmp_path / "m.db", "file")]
    assert preflight.store_locations("tracking.uri", "sqlite:///rel/m.db?timeout=5")[1][1] == Path("rel/m.db")
    assert preflight.store_locations("tracking.uri", f"file://{tmp_path / 'mlruns'}") == \
        [(folder, tmp_path / "mlruns", "dir")]
    assert preflight.store_locations("tracking.uri", "mlruns") == [(folder, Path("mlruns"), "dir")]
    for remote in ("http://127.0.0.1:5000", "postgresql://u:p@h/db", "databricks", "sqlite://", "sqlite:///:memory:"):
        assert preflight.store_locations("tracking.uri", remote) == [], remote


def test_a_server_store_has_no_local_artifact_folder_and_checkpoints_only_when_saved(tmp_path):
    cfg = _cfg(tmp_path, "tracking.uri=http://127.0.0.1:1", "train.checkpoint=false")
    assert preflight.run_locations(cfg) == []
    assert [w for w, _, _ in preflight.run_locations(cfg, checkpoints=True)] == ["train.checkpoint_dir (checkpoints)"]


@AS_ROOT
@pytest.mark.parametrize("key", ["store", "database", "art", "ck"])
def test_read_only_places_are_refused(tmp_path, key):
    for d in ("store", "art", "ck"):
        (tmp_path / d).mkdir()
    (tmp_path / "store" / "mlflow.db").write_bytes(b"")
    target = {"store": tmp_path / "store", "database": tmp_path / "store" / "mlflow.db",
              "art": tmp_path / "art", "ck": tmp_path / "ck"}[key]
    target.chmod(stat.S_IRUSR | (stat.S_IXUSR if target.is_dir() else 0))
    try:
        with pytest.raises(preflight.OutputError, match=f"{re.escape(str(target))}.* is not writable: .*Permission "
                                                        "denied"):
            preflight.check_outputs([_cfg(tmp_path)])
    finally:
        target.chmod(stat.S_IRWXU)
