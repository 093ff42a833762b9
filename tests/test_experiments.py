"""The shipped experiments (`conf/experiment/`) tell the story their comments promise.

`experiment=vanishing`: the vanishing alert names the early layers, and the norms it reports are
checked against a plain-PyTorch gradient of the checkpointed weights. `experiment=seed_xor` (the
tutorial) stalls and is not called vanishing; `experiment=xor_adam` converges with no alert.
"""

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

from gradwatch.train import train

N_LAYERS = 11  # experiment=vanishing: [2, 16 x 10, 1] is fc1 ... fc11
LAST = f"fc{N_LAYERS}"


def run(out: Path, *overrides: str) -> tuple[dict, Path]:
    """Train in-process with the real conf/ tree, writing into `out`: (final metrics, run dir)."""
    try:
        metrics = train(compose_config(list(overrides), out))
    finally:
        GlobalHydra.instance().clear()
    return metrics, out


def scalars_at(run_dir: Path, step: int) -> dict[str, float]:
    """Every scalar written at `step`, read back with TensorBoard's own event reader."""
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    values = {}
    for tag in acc.Tags()["tensors"]:
        if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
            continue
        for event in acc.Tensors(tag):
            if event.step == step:
                values[tag] = float(event.tensor_proto.float_val[0])
    return values


@pytest.fixture(scope="module")
def vanishing(tmp_path_factory) -> Iterator[tuple[dict, Path]]:
    """The experiment exactly as shipped (300 one-step epochs, about a second of fitting)."""
    yield run(tmp_path_factory.mktemp("vanishing") / "run", "experiment=vanishing")


def test_vanishing_alert_names_the_first_layer(vanishing):
    metrics, run_dir = vanishing
    assert metrics["alerts/vanishing"] >= 1
    alerts = json.loads((run_dir / "gradients.json").read_text())["alerts"]
    first = next(a for a in alerts if a["kind"] == "vanishing")
    # The first episode: the earliest layers, as soon as the patience (5 logs of 10 steps) is met.
    assert "fc1" in first["layers"] and "fc2" in first["layers"], first
    assert first["step"] == 49, first
    # Only early layers ever vanish: never the output layer or the ones next to it.
    named = {lay for a in alerts if a["kind"] == "vanishing" for lay in a["layers"]}
    assert named <= {f"fc{i}" for i in range(1, 6)}, named


def test_vanishing_norms_fall_by_orders_of_magnitude_towards_the_input(vanishing):
    _, run_dir = vanishing
    layers = json.loads((run_dir / "gradients.json").read_text())["layers"]
    assert layers["fc1"]["last"] * 100 <= layers[LAST]["last"], layers
    assert layers["fc1"]["alerts"].get("vanishing", 0) >= 1
    # At the start the norm grows layer by layer from the input to the output, >1e6 in all.
    first = [layers[f"fc{i}"]["first"] for i in range(1, N_LAYERS + 1)]
    assert first == sorted(first), first
    assert first[0] * 1e6 < first[-1], first


def test_vanishing_norms_match_plain_pytorch(vanishing, tmp_path):
    """The monitor's last logged norms (step 299, before that step's update) against the gradient
    of w_299 computed in plain PyTorch; w_299 is the end of the same run stopped one step early."""
    metrics, run_a = vanishing
    steps = metrics["steps"]
    _, run_b = run(tmp_path / "run", "experiment=vanishing", f"trainer.max_epochs={steps - 1}")
    state = torch.load(run_b / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == steps - 1
    weights = {k.removeprefix("net."): v.requires_grad_() for k, v in state["state_dict"].items()}

    # The full training set (one full batch per step), its loss, backward: no Lightning, no model.
    data = instantiate(compose_config(["experiment=vanishing"], tmp_path / "unused").data)
    GlobalHydra.instance().clear()
    h = data.train_x
    for i in range(1, N_LAYERS + 1):
        h = F.linear(h, weights[f"fc{i}.weight"], weights[f"fc{i}.bias"])
        h = torch.sigmoid(h) if i < N_LAYERS else h
    loss = F.binary_cross_entropy_with_logits(h.squeeze(1), data.train_y.float())
    grads = dict(zip(weights, torch.autograd.grad(loss, list(weights.values())), strict=True))

    logged = scalars_at(run_a, steps - 1)
    summary = json.loads((run_a / "gradients.json").read_text())["layers"]
    for i in range(1, N_LAYERS + 1):
        lay = f"fc{i}"
        per_param = {
            p: torch.linalg.vector_norm(grads[f"{lay}.{p}"]).item() for p in ("weight", "bias")
        }
        layer_norm = math.hypot(*per_param.values())
        # TensorBoard keeps float32; gradients.json keeps the monitor's float64 host value.
        assert logged[f"grad_norm/{lay}"] == pytest.approx(layer_norm, rel=1e-5), lay
        assert summary[lay]["last"] == pytest.approx(layer_norm, rel=1e-5), lay
        for p, v in per_param.items():
            assert logged[f"grad_norm/{lay}.{p}"] == pytest.approx(v, rel=1e-5), (lay, p)
    assert layer_norm > 100 * summary["fc1"]["last"]  # the last layer against fc1, recomputed

    # And plain SGD's identity on the output layer: ||w_299 - w_300|| / lr is that gradient.
    # (Not on fc1: lr x 1e-9 is below float32's resolution of its weights, which never move.)
    after = torch.load(run_a / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    lr = 0.01
    delta = torch.linalg.vector_norm(after[f"net.{LAST}.weight"] - weights[f"{LAST}.weight"])
    assert delta.item() / lr == pytest.approx(logged[f"grad_norm/{LAST}.weight"], rel=1e-2)


def test_seed_xor_stalls_and_is_not_vanishing(tmp_path):
    # The tutorial's run, cut to 1000 epochs (20 logs): the stall needs 10 flat logs in a row.
    metrics, run_dir = run(tmp_path / "run", "experiment=seed_xor", "trainer.max_epochs=1000")
    assert metrics.get("alerts/stall", 0) >= 1, metrics
    assert metrics.get("alerts/vanishing", 0) == 0, metrics
    alerts = json.loads((run_dir / "gradients.json").read_text())["alerts"]
    stall = next(a for a in alerts if a["kind"] == "stall")
    assert "learning rate looks too small" in stall["message"]


@pytest.mark.parametrize("lr", ["0.05", "0.01"])
def test_xor_adam_converges_with_no_alert(tmp_path, lr):
    # lr 0.05 ends at a loss of exactly 0; lr 0.01 at about 1e-13, its gradients below 1e-7:
    # converged, not vanishing.
    metrics, run_dir = run(tmp_path / "run", "experiment=xor_adam", f"optimizer.lr={lr}")
    assert metrics["alerts"] == 0, metrics
    assert json.loads((run_dir / "gradients.json").read_text())["alerts"] == []
    assert metrics["train/acc"] == 1.0
