"""`logger=mlflow` (the optional extra): the same scalars as TensorBoard, read back with MLflow's
own client, and the model's hyperparameters as run params."""

import warnings
from pathlib import Path

import numpy as np
import pytest
from lightning.fabric.utilities.logger import _flatten_dict
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradwatch.monitor import GradientAlert
from gradwatch.train import train

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

# Logging (and histograms, 10x the scalar cadence) every step, so a short run covers both.
RUN = ("trainer=debug", "trainer.max_epochs=12")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One store (paths.root) for the module: creating MLflow's SQLite tables takes seconds."""
    return tmp_path_factory.mktemp("mlflow_root")


@pytest.fixture(autouse=True)
def no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def mlflow_run(store: Path, run_dir: Path):
    """The client for the config's default store, and the run named after `run_dir`."""
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    experiment = client.get_experiment_by_name("xor")
    runs = [
        r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == str(run_dir)
    ]
    assert len(runs) == 1
    return client, runs[0]


def test_mlflow_gets_tensorboards_scalars_and_the_hyperparameters(make_cfg, store, tmp_path):
    cfg = make_cfg("logger=[tensorboard,mlflow]", f"paths.root={store}", *RUN)
    assert cfg.logger.mlflow.tracking_uri == f"sqlite:///{store}/mlflow.db"
    with warnings.catch_warnings():
        # No metric name may need MLflow's renaming (Lightning warns when it would).
        warnings.filterwarnings("error", message=".*MLFlow only allows.*")
        final = train(cfg)
    run_dir = tmp_path / "run"
    client, run = mlflow_run(store, run_dir)
    assert run.info.status == "FINISHED"

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    # TensorBoard alone gets the log10 copies that its first screen charts.
    tags = [t for t in events.Tags()["scalars"] if "_log10/" not in t]
    assert "grad_norm_log10/fc1" in events.Tags()["scalars"]
    assert "train/loss" in tags and "grad_norm/total" in tags and "grad_norm/fc1.weight" in tags
    # Every other scalar TensorBoard has, MLflow has under the same name, and nothing else.
    assert set(run.data.metrics) == set(tags)
    for tag in tags:
        tb = [(e.step, e.value) for e in events.Scalars(tag)]
        history = client.get_metric_history(run.info.run_id, tag)
        ml = sorted((m.step, m.value) for m in history)
        assert [s for s, _ in ml] == [s for s, _ in tb], tag
        # TensorBoard keeps float32; MLflow the float it was given: equal once rounded alike.
        assert [np.float32(v) for _, v in ml] == [np.float32(v) for _, v in tb], tag
    assert len(events.Scalars("train/loss")) == 12
    assert {s.step for s in events.Scalars("grad_norm/total")} == set(range(12))

    # final/* as the run summary computed them (metrics.json), at the last step.
    assert run.data.metrics["final/train_loss"] == pytest.approx(final["train/loss"])
    assert run.data.metrics["final/steps"] == 12
    # The model's hyperparameters (flattened, as MLFlowLogger logs them) are the run's params.
    hparams = OmegaConf.to_container(OmegaConf.load(run_dir / "hparams.yaml"))
    expected = {k: str(v) for k, v in _flatten_dict(hparams).items()}
    assert expected.items() <= run.data.params.items()
    assert run.data.params["optimizer/lr"] == "0.01"
    # ... and so are the run's settings, as TensorBoard's HParams table shows them.
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert run.data.params["trainer.max_epochs"] == str(saved.trainer.max_epochs)
    assert run.data.params["seed"] == "0" and run.data.params["data.name"] == "xor"
    assert run.data.tags["overrides"].startswith("logger=[tensorboard,mlflow]")


def test_mlflow_alone_runs_and_says_once_that_histograms_need_tensorboard(
    make_cfg, store, tmp_path
):
    with pytest.warns(GradientAlert) as record:
        train(make_cfg("logger=mlflow", f"paths.root={store}", *RUN))
    alerts = [str(w.message) for w in record if issubclass(w.category, GradientAlert)]
    histogram_alerts = [a for a in alerts if "histograms need a TensorBoardLogger" in a]
    assert len(histogram_alerts) == 1 and "MLFlowLogger" in histogram_alerts[0]

    run_dir = tmp_path / "run"
    assert not list(run_dir.glob("events.out.tfevents.*"))
    client, run = mlflow_run(store, run_dir)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "grad_norm/total")]
    assert sorted(steps) == list(range(12))
    assert "final/train_loss" in run.data.metrics
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
