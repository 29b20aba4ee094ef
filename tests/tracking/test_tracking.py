"""MLflow tracking: the metric writer process stores everything in order, reports failures, and never
outlives its trainer; the inline path stores the same."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fincast import tracking
from fincast.config import TrackingConfig


def _cfg(tmp_path, writer="process"):
    return TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_dir=str(tmp_path / "art"),
                          metrics_writer=writer)


@pytest.mark.parametrize("mode", ["process", "inline"])
def test_every_metric_is_stored_in_order(tmp_path, mode):
    cfg = _cfg(tmp_path, mode)
    writer = tracking.MetricWriter.maybe(cfg)
    assert (writer is not None) == (mode == "process")
    try:
        run = tracking.start_run(cfg, "exp", "r", writer=writer)
        sent = []
        for chunk in range(5):
            rows = [("train/loss", 1.0 / (s + 1), s) for s in range(chunk * 300, (chunk + 1) * 300)]
            sent += rows
            run.log_metrics(rows)  # 1500 values: more than one log_batch allows (1000)
        run.end()
    finally:
        if writer is not None:
            writer.close()
    stored = tracking.metric_history(run.run_id, "train/loss", cfg)
    assert stored == [(s, v) for _, v, s in sent]
    assert tracking.get_run(run.run_id, cfg).info.status == "FINISHED"


def test_one_writer_serves_runs_in_turn(tmp_path):
    cfg = _cfg(tmp_path)
    writer = tracking.MetricWriter(tracking.resolve_uri(cfg))
    try:
        ids = []
        for i in range(2):
            run = tracking.start_run(cfg, "exp", f"r{i}", writer=writer)
            run.log_metrics([("m", float(i), 1)])
            run.end()
            ids.append(run.run_id)
    finally:
        writer.close()
    assert [tracking.metric_history(r, "m", cfg) for r in ids] == [[(1, 0.0)], [(1, 1.0)]]


def test_a_failed_write_is_reported_and_the_run_still_ends(tmp_path):
    cfg = _cfg(tmp_path)
    writer = tracking.MetricWriter(tracking.resolve_uri(cfg))
    try:
        run = tracking.start_run(cfg, "exp", "r", writer=writer)
        run.log_metrics([("bad key!?", 1.0, 1)])  # MLflow rejects this name
        with pytest.raises(tracking.WriterError, match="bad key"):
            run.end("FINISHED")
        assert tracking.get_run(run.run_id, cfg).info.status == "FAILED"  # not a clean run with holes
        run2 = tracking.start_run(cfg, "exp", "r2", writer=writer)  # the writer goes on serving
        run2.log_metrics([("ok", 2.0, 1)])
        run2.end()
        assert tracking.metric_history(run2.run_id, "ok", cfg) == [(1, 2.0)]
    finally:
        writer.close()


def test_writer_does_not_touch_the_store_until_asked(tmp_path):
    writer = tracking.MetricWriter(f"sqlite:///{tmp_path / 'mlflow.db'}")
    time.sleep(1.0)
    writer.close()
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow  # a few seconds of process start-up; runs in make test-slow and .ci/run
def test_writer_exits_when_its_trainer_is_killed(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from fincast import tracking
        w = tracking.MetricWriter("sqlite:///{tmp_path / 'mlflow.db'}")
        w.ready()
        print(w.pid, flush=True)
        time.sleep(60)
    """)
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        writer_pid = int(trainer.stdout.readline())
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait()
        assert writer_pid != trainer.pid  # the writer is a process of its own
        deadline = time.monotonic() + 15
        gone = False
        while not gone and time.monotonic() < deadline:
            try:
                os.kill(writer_pid, 0)
                time.sleep(0.2)
            except ProcessLookupError:
                gone = True
        assert gone, f"writer {writer_pid} still runs 15 s after its trainer was killed"
    finally:
        if trainer.poll() is None:
            trainer.kill()


def test_a_dead_writer_is_reported_and_does_not_hang_the_trainer(tmp_path):
    """If the writer dies (e.g. the OOM killer), the next put fails clearly and the trainer still exits."""
    script = textwrap.dedent(f"""
        import os, signal, time
        from fincast import tracking
        from fincast.config import TrackingConfig
        cfg = TrackingConfig(uri="sqlite:///{tmp_path / 'mlflow.db'}", artifact_dir="{tmp_path / 'art'}")
        w = tracking.MetricWriter(tracking.resolve_uri(cfg))
        run = tracking.start_run(cfg, "exp", "r", writer=w)
        os.kill(w.pid, signal.SIGKILL)
        time.sleep(0.5)
        try:
            for i in range(200):
                run.log_metrics([("m", 1.0, s) for s in range(i * 500, (i + 1) * 500)])
        except tracking.WriterError as exc:
            print("raised:", exc)
        w.close()
        print("closed")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "raised: the metric writer process died" in r.stdout and "closed" in r.stdout


def test_metrics_go_through_mlflows_public_api_only():
    """No fincast module writes or reads MLflow's internal tables (they change between MLflow versions)."""
    from pathlib import Path

    import fincast

    root = Path(fincast.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for internal in ("dbmodels", "SqlMetric", "SqlLatestMetric", "ManagedSessionMaker", "_tracking_client"):
            assert internal not in text, f"{path.relative_to(root)} uses MLflow's internal {internal}"


@pytest.mark.parametrize("fmt", ["pt2", "pickle"])
def test_a_model_logged_on_a_gpu_machine_is_checked_on_the_cpu_quietly(tmp_path, monkeypatch, capfd, fmt):
    """MLflow checks a logged model by predicting its input example, on the GPU when one is visible; a model
    exported from the CPU cannot load there ("Got error: ... can't be loaded on 'cuda' device"). With a GPU
    pretended, nothing is printed, the environment is left as it was, and the model predicts what it did."""
    import mlflow.pyfunc
    import numpy as np
    import torch

    cfg = _cfg(tmp_path, "inline")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 1)).eval()
    example = np.arange(12, dtype=np.float32).reshape(2, 3, 2) / 10
    with torch.no_grad():
        prediction = model(torch.as_tensor(example)).numpy()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", raising=False)
    run = tracking.start_run(cfg, "exp", "r")
    uri = run.log_model(model, example, prediction, fmt=fmt)
    run.end()
    out, err = capfd.readouterr()
    assert "Got error" not in out + err and "can't be loaded" not in out + err
    assert "WARNING" not in out + err  # (MLflow warns about pickled models on every log)
    assert "MLFLOW_DEFAULT_PREDICTION_DEVICE" not in os.environ
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = mlflow.pyfunc.load_model(uri)
    np.testing.assert_allclose(np.asarray(loaded.predict(example)).reshape(-1), prediction.reshape(-1), rtol=1e-6)


def _count_batches(run) -> list:
    """The keyword arguments of every log_batch call the run makes from now on."""
    calls = []
    real = run.client.log_batch
    run.client.log_batch = lambda *a, **kw: (calls.append(kw), real(*a, **kw))[1]
    return calls


def test_values_go_in_one_call_when_they_fit_and_all_arrive_when_they_do_not(tmp_path):
    cfg = _cfg(tmp_path, "inline")
    run = tracking.start_run(cfg, "exp", "r")
    calls = _count_batches(run)
    run.log_values([("m", 1.5, 3)], params={"p": 1}, tags={"t": "x"})
    assert len(calls) == 1
    many = {f"p{i}": i for i in range(150)}  # more params than one log_batch takes (100)
    run.log_values([("m", 2.5, 4)], params=many, tags={"u": "y"})
    assert len(calls) > 2
    run.end()
    stored = tracking.get_run(run.run_id, cfg)
    assert stored.data.params["p"] == "1" and stored.data.params["p149"] == "149" and len(stored.data.params) == 151
    assert stored.data.tags["t"] == "x" and stored.data.tags["u"] == "y"
    assert tracking.metric_history(run.run_id, "m", cfg) == [(3, 1.5), (4, 2.5)]


def test_held_metrics_go_with_the_closing_values_in_one_call_and_the_rest_at_the_end(tmp_path):
    cfg = _cfg(tmp_path, "inline")
    run = tracking.start_run(cfg, "exp", "r")
    calls = _count_batches(run)
    run.hold_metrics()
    for s in range(0, 300, 100):
        run.log_metrics([("train/loss", 1.0 / (s + 1), s), ("grad/norm", 2.0, s)])
    assert calls == []  # held
    run.log_values([("test/rmse", 0.5, 300)], tags={"t": "x"})
    assert len(calls) == 1 and len(calls[0]["metrics"]) == 7  # the 6 held and the closing one
    run.log_metrics([("train/loss", 9.0, 400)])
    late = [("late", float(i), i) for i in range(1200)]  # more than one log_batch takes, through log_values
    run.log_values(late)
    run.log_metrics([("train/loss", 8.0, 500)])
    run.end()  # sends what is still held
    assert tracking.metric_history(run.run_id, "train/loss", cfg) == [(0, 1.0), (100, 1 / 101), (200, 1 / 201),
                                                                    (400, 9.0), (500, 8.0)]
    assert len(tracking.metric_history(run.run_id, "late", cfg)) == 1200
    assert tracking.get_run(run.run_id, cfg).data.tags["t"] == "x"


def test_a_folders_files_go_in_one_call(tmp_path):
    cfg = _cfg(tmp_path, "inline")
    run = tracking.start_run(cfg, "exp", "r")
    folder = tmp_path / "files"
    folder.mkdir()
    files = [folder / "a.yaml", folder / "b.csv"]
    for f in files:
        f.write_text(f.name)
    calls = []
    real_one, real_all = run.client.log_artifact, run.client.log_artifacts
    run.client.log_artifact = lambda *a, **kw: (calls.append("one"), real_one(*a, **kw))[1]
    run.client.log_artifacts = lambda *a, **kw: (calls.append("all"), real_all(*a, **kw))[1]
    run.log_files(files)
    (folder / "c.txt").write_text("not asked for")  # no longer the folder's whole content: file by file
    run.log_files(files)
    assert calls == ["all", "one", "one"]
    run.end()
    assert sorted(a.path for a in run.client.list_artifacts(run.run_id)) == ["a.yaml", "b.csv"]
