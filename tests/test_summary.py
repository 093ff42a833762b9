"""The end-of-run record: metrics.json and TensorBoard's HParams entry say the same thing."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import backend_context, plugin_data_pb2

from gradwatch.train import train


def read_run(run_dir):
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return events


def test_hparams_and_final_metrics_reach_tensorboard(make_cfg, tmp_path):
    metrics = train(make_cfg("optimizer=adam", "optimizer.lr=0.05", "trainer.max_epochs=40"))
    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text()) == metrics
    events = read_run(run)

    # Every final metric is a scalar at the last step (the HParams table reads these tags).
    for key in ("train/loss", "train/acc", "grad_norm/total"):
        (point,) = events.Scalars("final/" + key.replace("/", "_"))
        assert point.step == 40
        assert point.value == pytest.approx(metrics[key], rel=1e-6)

    # The HParams session names the run's choices.
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["optimizer"].string_value == "Adam"
    assert hparams["optimizer.lr"].number_value == 0.05
    assert hparams["model.layer_sizes"].string_value == "[2, 2, 1]"
    assert hparams["trainer.max_epochs"].number_value == 40
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    tags = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"final/train_loss", "final/train_acc", "final/grad_norm_total"} <= tags
    # The columns TensorBoard ticks by default (its first five, in its own order) are the
    # choices that tell runs apart, with the final metrics beside them.
    names = {info.name for info in experiment.experiment.hparam_infos}
    backend_context._sort_and_reduce_to_hparams_limit(experiment.experiment, 5)
    assert [info.name for info in experiment.experiment.hparam_infos] == [
        "model.activation",
        "model.layer_sizes",
        "optimizer",
        "optimizer.lr",
        "trainer.max_epochs",
    ]
    assert {"seed", "data.name", "data.batch_size"} <= names


@pytest.mark.parametrize("precision", ["64-true", "bf16-mixed"])
def test_final_metrics_go_through_the_trainer_s_precision(make_cfg, tmp_path, precision):
    """64-true trains on doubles and bf16-mixed under autocast: the end-of-run evaluation goes
    through the same plugin (it used to feed float32 data to a double model and crash after
    the whole run). Against the tutorial's network in plain PyTorch, from the last checkpoint."""
    metrics = train(make_cfg(f"trainer.precision={precision}", "trainer.max_epochs=30"))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    w = {k.split(".", 1)[1]: v for k, v in state["state_dict"].items()}
    dtype = torch.float64 if precision == "64-true" else torch.float32
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=dtype)
    y = torch.tensor([[0.0], [1.0], [1.0], [0.0]], dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        hidden = torch.sigmoid(torch.nn.functional.linear(x, w["fc1.weight"], w["fc1.bias"]))
        out = torch.nn.functional.linear(hidden, w["fc2.weight"], w["fc2.bias"])  # no sigmoid
        loss = torch.nn.functional.mse_loss(out, y).item()
    assert metrics["train/loss"] == pytest.approx(loss, rel=1e-12)
