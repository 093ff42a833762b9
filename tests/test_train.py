"""The training path end to end, checked against the tutorial's loop in plain PyTorch."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from torch import nn

from gradwatch.console import format_tensor
from gradwatch.model import MLPModule
from gradwatch.train import train

XOR_X = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_Y = torch.tensor([[0.0], [1.0], [1.0], [0.0]])


class TutorialNet(nn.Module):
    """The tutorial's network, written out in plain PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 2)
        self.fc2 = nn.Linear(2, 1)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)))


def tutorial_loop(epochs: int, seed: int = 0, lr: float = 0.01) -> tuple[list[float], nn.Module]:
    """The tutorial's training loop: the loss of every epoch and the trained network."""
    torch.manual_seed(seed)
    net = TutorialNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(net(XOR_X), XOR_Y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, net


def test_seed_run_prints_the_tutorials_losses(make_cfg, caplog):
    caplog.set_level(logging.INFO, logger="gradwatch")
    train(make_cfg("experiment=seed_xor", "trainer.max_epochs=40", "print_every=10"))
    expected, _ = tutorial_loop(40)
    printed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Epoch ")]
    # Same seed, same network, same loss: the very numbers the plain loop prints, unrounded.
    assert printed == [f"Epoch {e}, Loss: {expected[e - 1]}" for e in (10, 20, 30, 40)]


def test_seed_run_ends_with_the_tutorials_weights_and_gradient(make_cfg, caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="gradwatch")
    # 50 epochs: a validation epoch (check_val_every_n_epoch), where Lightning frees gradients.
    metrics = train(make_cfg("experiment=seed_xor", "trainer.max_epochs=50"))
    _, net = tutorial_loop(50)
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    for name, value in net.state_dict().items():
        assert torch.equal(ckpt["state_dict"][f"net.{name}"], value), name
    # metrics.json's loss is the trained network's loss on the four points.
    assert metrics["train/loss"] == pytest.approx(nn.functional.mse_loss(net(XOR_X), XOR_Y).item())
    assert json.loads((tmp_path / "run/metrics.json").read_text()) == metrics
    # The tutorial's last step: fc1.weight.grad, printed after training.
    lines = [r.getMessage() for r in caplog.records]
    header = lines.index("Gradients of the first layer weights (fc1.weight):")
    assert lines[header + 1] == format_tensor(net.fc1.weight.grad)
    assert "e-0" in lines[header + 1]  # every digit, not torch's default four decimals


def test_run_directory_holds_the_whole_run(make_cfg, tmp_path):
    train(make_cfg("trainer.max_epochs=60", "trainer.log_every_n_steps=10"))
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "overrides.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints/last.ckpt").is_file()
    assert set(json.loads((run / "metrics.json").read_text())) >= {"train/loss", "train/acc"}


def test_checkpoint_round_trip_with_safe_loading(make_cfg, tmp_path):
    train(make_cfg("optimizer=adam", "trainer.max_epochs=20"))
    path = tmp_path / "run/checkpoints/last.ckpt"
    ckpt = torch.load(path, weights_only=True)  # plain values only: no pickled callables
    assert ckpt["hyper_parameters"]["optimizer"]["_target_"] == "torch.optim.Adam"
    assert ckpt["global_step"] == 20
    restored = MLPModule.load_from_checkpoint(path, weights_only=True)
    for name, value in restored.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][name])
    assert restored.hparams.layer_sizes == [2, 2, 1]


def test_resumed_run_ends_bit_for_bit_where_an_uninterrupted_one_does(make_cfg, tmp_path):
    train(make_cfg("optimizer=adam", "trainer.max_epochs=30"))
    uninterrupted = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    first = make_cfg("optimizer=adam", "trainer.max_epochs=12")
    first.paths.output_dir = str(tmp_path / "first")
    train(first)
    resumed = make_cfg(
        "optimizer=adam",
        "trainer.max_epochs=30",
        f"ckpt_path={tmp_path}/first/checkpoints/last.ckpt",
    )
    resumed.paths.output_dir = str(tmp_path / "first")
    train(resumed)
    final = torch.load(tmp_path / "first/checkpoints/last.ckpt", weights_only=True)
    assert final["global_step"] == 30
    for name, value in uninterrupted["state_dict"].items():
        assert torch.equal(final["state_dict"][name], value), name


def test_xor_adam_solves_xor(make_cfg):
    metrics = train(make_cfg("experiment=xor_adam"))
    assert metrics["train/loss"] < 0.01
    assert metrics["train/acc"] == 1.0


def test_command_line_runs_the_overrides_and_saves_them(tmp_path):
    command = [sys.executable, "-m", "gradwatch.train", "optimizer=adam", "optimizer.lr=0.05"]
    command += ["trainer.max_epochs=15", "print_every=5", f"paths.root={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Epoch 15, Loss: " in done.stdout
    (run,) = (tmp_path / "xor").iterdir()
    saved = (run / "config.yaml").read_text()
    assert "_target_: torch.optim.Adam" in saved and "lr: 0.05" in saved
    assert "max_epochs: 15" in saved
    assert "optimizer.lr=0.05" in (run / "overrides.yaml").read_text()
    assert (run / "train.log").read_text().count("Epoch 15, Loss: ") == 1


def test_make_passes_overrides_straight_to_hydra():
    # As typed in a shell, even when the tests themselves run under `make test`.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(
        [
            "make",
            "-n",
            "train",
            "optimizer=adam",
            "trainer.max_epochs=2000",
            "model.layer_sizes=[2, 8,1]",
            "ARGS=seed=3 name=x",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=True,
    )
    # The last line is the shell command; run it with `echo` in place of Python to see the argv.
    command = done.stdout.strip().splitlines()[-1].replace(".venv/bin/python -m", "printf '%s\\n'")
    argv = subprocess.run(command, shell=True, capture_output=True, text=True).stdout.split("\n")
    assert sorted(argv[argv.index("gradwatch.train") + 1 : -1]) == [
        "model.layer_sizes=[2, 8,1]",
        "name=x",
        "optimizer=adam",
        "seed=3",
        "trainer.max_epochs=2000",
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_run_logs_what_the_cpu_run_logs(make_cfg, tmp_path):
    """`trainer=gpu`: the same seed gives the same tags, the same norms (to float precision) and
    histograms whose counts sum to each tensor's size, read back from the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(name: str, *overrides: str) -> EventAccumulator:
        # The tutorial's tensors (1 to 4 values) are under the default histogram_min_values.
        cfg = make_cfg(
            "trainer.max_epochs=200",
            "trainer.log_every_n_steps=10",
            "callbacks.gradient_monitor.histogram_min_values=1",
            *overrides,
        )
        cfg.paths.output_dir = str(tmp_path / name)
        train(cfg)
        acc = EventAccumulator(str(tmp_path / name), size_guidance={"scalars": 0, "histograms": 0})
        acc.Reload()
        return acc

    cpu, gpu = run("cpu"), run("gpu", "trainer=gpu")
    assert cpu.Tags()["scalars"] == gpu.Tags()["scalars"]
    assert cpu.Tags()["histograms"] == gpu.Tags()["histograms"] != []
    for tag in cpu.Tags()["scalars"]:
        if tag.startswith(("grad_norm/", "weight_norm/", "train/loss")):
            want = [(e.step, e.value) for e in cpu.Scalars(tag)]
            got = [(e.step, e.value) for e in gpu.Scalars(tag)]
            assert [s for s, _ in got] == [s for s, _ in want], tag
            assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-4), tag
    sizes = {"fc1.weight": 4, "fc1.bias": 2, "fc2.weight": 2, "fc2.bias": 1}
    for tag in gpu.Tags()["histograms"]:
        for event in gpu.Histograms(tag):
            assert event.histogram_value.num == sizes[tag.split("/", 1)[1]], tag
