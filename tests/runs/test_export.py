"""A study's runs keep their weights in one weights-only file per stacked batch on the parent run (no MLflow model
per run), and `fincast export RUN_ID` makes any of them an MLflow model on demand."""

from __future__ import annotations

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from tiny_study import TINY, _spec

from fincast import cli, tracking
from fincast.config import FincastError, TrackingConfig
from fincast.experiments import study as study_mod
from fincast.runs import forecast, weights
from fincast.training import evaluate


def _models_of(client: MlflowClient, exp_id: str, run_id: str) -> list:
    return list(client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}'"))


@pytest.mark.slow  # a 6-run study and one export (~15 s)
def test_study_runs_keep_weights_on_the_parent_and_export_makes_the_model(tmp_path, capsys):
    store = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_dir={tmp_path / 'art'}"]
    spec = _spec(tmp_path, lr=[1e-2])
    raw = yaml.safe_load(spec.read_text())
    raw["set"]["tracking.log_model"] = True
    spec.write_text(yaml.safe_dump(raw))
    out = study_mod.run(study_mod.load(spec, [*TINY, *store, "study.batch_runs=3", "study.workers=1"]))
    assert out.finished == 6
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("tiny_study").experiment_id
    children = client.search_runs([exp_id], "tags.`fincast.study_role` = 'child'")
    assert len(children) == 6
    assert all(not _models_of(client, exp_id, r.info.run_id) for r in children)  # no MLflow model per run
    params = children[0].data.params  # what varies, the key settings, the run's data; config.yaml has the rest
    assert {"clip.method", "train.seed", "samples.train", "model.parameters"} <= set(params)
    assert "tracking.log_every" not in params and len(params) < 40
    assert "config.yaml" in [a.path for a in client.list_artifacts(children[0].info.run_id)]
    files = {r.data.tags[weights.WEIGHTS_TAG] for r in children}
    assert len(files) == 2 and all(f.startswith("weights/") for f in files)  # one file per stacked batch
    assert sorted(a.path for a in client.list_artifacts(out.parent_run_id, "weights")) == sorted(files)

    # the weights are the run's best: its model on its validation split scores its logged best_val_loss
    child = children[0]
    cfg = study_mod.load(spec, [*TINY, *store]).jobs[0].cfg
    data = forecast.load(cfg)
    splits = forecast.prepare(cfg, data)
    model = forecast.build_model(cfg, splits)
    model.load_state_dict(weights.load(uri, child.info.run_id, out.parent_run_id, child.data.tags[weights.WEIGHTS_TAG]))
    val_loss, _, _ = evaluate(model, splits.val, torch.device("cpu"))
    assert val_loss == pytest.approx(child.data.metrics["best_val_loss"], rel=1e-5)

    assert cli.main(["export", child.info.run_id, "--tracking-uri", uri]) == 0
    assert "model logged" in capsys.readouterr().out
    assert len(_models_of(client, exp_id, child.info.run_id)) == 1
    assert tracking.get_run(child.info.run_id, TrackingConfig(uri=uri)).info.status == "FINISHED"


def test_export_of_a_run_without_a_weights_file_says_why(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tracking.start_run(TrackingConfig(uri=uri, artifact_dir=str(tmp_path / "art")), "e", "single run")
    run.end("FINISHED")
    from fincast.runs import export

    with pytest.raises(FincastError, match="has no weights file on a parent run"):
        export.export(run.run_id, tracking_uri=uri)
