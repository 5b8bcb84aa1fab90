"""Experiment tracking (--log-with): what a run wrote to TensorBoard and MLflow, read back with their own readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import headstart
from headstart.cli import main
from headstart.errors import ConfigError
from headstart.training import tracking

FAST = {"backbone": "tiny_cnn", "batch_size": 8, "num_workers": 0, "precision": "fp32", "run.audit": False}


def test_extract_run_in_tensorboard(image_folder: Path, tiny_weights: Path, cache_dir: Path, tmp_path: Path) -> None:
    from tbparse import SummaryReader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = headstart.train(image_folder, strategy="extract", weights=str(tiny_weights), out=str(out),
                             cache_dir=str(cache_dir), log_with="tensorboard", **FAST)  # fmt: skip
    logs = out / "tracking" / "run"  # Accelerate's TensorBoard tracker: <tracking dir>/<project = run folder name>
    scalars = SummaryReader(str(logs)).scalars
    final = scalars[scalars.tag == "final/accuracy"]
    assert final.value.tolist() == pytest.approx([result.metrics["accuracy"]]) and final.step.tolist() == [0]
    assert "cv_accuracy" in set(scalars.tag)  # the head's row (an extract run's epoch 0)
    events = EventAccumulator(str(logs), size_guidance={"images": 0})
    events.Reload()
    figures = sorted(p.stem for p in (out / "figures").glob("*.png"))
    assert figures and events.Tags()["images"] == sorted(f"figures/{name}" for name in figures)
    hparams = SummaryReader(str(logs)).hparams  # add_hparams writes them beside, in a run of their own
    assert dict(zip(hparams.tag, hparams.value, strict=True))["model.backbone"] == "tiny_cnn"


def test_finetune_run_in_mlflow(image_folder: Path, tiny_weights: Path, cache_dir: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    out, store = tmp_path / "run", tmp_path / "tracking"
    headstart.train(image_folder, strategy="finetune", weights=str(tiny_weights), out=str(out), epochs=2,
                    cache_dir=str(cache_dir), log_with="mlflow", tracking_dir=str(store), **FAST)  # fmt: skip
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")  # the store inside --tracking-dir
    (experiment,) = [e for e in client.search_experiments() if e.name == "run"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["strategy"] == "finetune" and run.data.params["optim.epochs"] == "2"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert sorted((m.step, m.value) for m in history) == [(r["epoch"], pytest.approx(r["accuracy"])) for r in rows]
    assert client.get_metric_history(run.info.run_id, "final/accuracy")[0].step == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert artifacts and artifacts == {f"figures/{p.name}" for p in (out / "figures").glob("*.png")}
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith(str(store / "artifacts"))


def test_missing_tracker_fails_before_training(image_folder: Path, tiny_weights: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(ConfigError, match=r"pip install 'headstart\[track\]'"):
        headstart.train(image_folder, strategy="extract", out=str(tmp_path / "run"), log_with="mlflow", **FAST)
    assert not (tmp_path / "run").exists()  # nothing started: no half-made run folder
    code = main(["train", str(image_folder), "--strategy", "extract", "--log-with", "mlflow",
                 "--out", str(tmp_path / "cli")])  # fmt: skip
    assert code == 2 and "needs the package 'mlflow'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="choose one of tensorboard, mlflow"):
        headstart.train(image_folder, out=str(tmp_path / "x"), **{"run.log_with": "wandb"}, **FAST)
