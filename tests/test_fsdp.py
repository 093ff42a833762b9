"""`trainer=fsdp` from the command line: FSDP2 (`fully_shard` per layer, MLPModule.configure_model)
through Lightning's ModelParallelStrategy, two CPU processes over gloo. One run directory, the
single-process run's gradient norms, and a resume that continues bit for bit."""

import json
import math
from pathlib import Path

import pytest
import torch
from test_distributed import RUN, assert_one_run, read_scalars, run_cli

from gradwatch.preflight import check_config
from gradwatch.train import train
from gradwatch.validate import ConfigError

FSDP = ["trainer=fsdp"]
FAMILIES = ("grad_norm/", "weight_norm/", "update_ratio/")


@pytest.mark.slow
def test_fsdp_run_writes_one_directory_with_the_single_process_norms(tmp_path, make_cfg):
    # Clipped, so that the clipped total (measured after Lightning clips the shards) is compared.
    clip = "trainer.gradient_clip_val=0.1"
    root, output = run_cli([*RUN, *FSDP, clip], tmp_path)
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    (run_dir,) = (root / "moons").iterdir()
    assert_one_run(run_dir)
    # The first layer's whole gradient (8 rows), gathered from the two shards.
    printed = output.split("Gradients of the first layer weights (fc1.weight):")[1]
    assert printed.count("[") == 9 and "DTensor" not in printed

    cfg = make_cfg(*RUN, clip)
    single_metrics = train(cfg)
    single = read_scalars(Path(cfg.paths.output_dir))
    fsdp = read_scalars(run_dir)
    tags = [t for t in single if t.startswith(FAMILIES)]
    expected = {"grad_norm/total", "grad_norm/total_clipped", "grad_norm/fc1.weight"}
    assert expected | {"update_ratio/fc2"} <= set(tags)
    assert sorted(t for t in fsdp if t.startswith(FAMILIES)) == sorted(tags)
    for tag in tags:
        assert [s for s, _ in fsdp[tag]] == [s for s, _ in single[tag]] == list(range(12)), tag
        for (step, a), (_, b) in zip(single[tag], fsdp[tag], strict=True):
            assert math.isclose(a, b, rel_tol=1e-6), (tag, step, a, b)
    fsdp_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert fsdp_metrics["steps"] == single_metrics["steps"] == 12
    assert math.isclose(fsdp_metrics["train/loss"], single_metrics["train/loss"], rel_tol=1e-5)


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, weights_only=True)
    tensors = {f"state_dict.{k}": v for k, v in checkpoint["state_dict"].items()}
    for i, state in enumerate(checkpoint["optimizer_states"]):
        for param, values in state["state"].items():
            for key, value in values.items():
                tensors[f"optimizer{i}.{param}.{key}"] = torch.as_tensor(value)
    return tensors


@pytest.mark.slow
def test_fsdp_resume_continues_bit_for_bit(tmp_path):
    """Two epochs, then resumed for a third, against three epochs at once: the same weights and
    Adam state in the last checkpoint, the same values logged after the resume, to the bit."""
    args = [*RUN, *FSDP, "optimizer=adam"]
    (tmp_path / "whole").mkdir()
    (tmp_path / "cut").mkdir()
    whole_root, _ = run_cli([*args, "trainer.max_epochs=3"], tmp_path / "whole")
    (whole,) = (whole_root / "moons").iterdir()
    root, _ = run_cli([*args, "trainer.max_epochs=2"], tmp_path / "cut")
    (cut,) = (root / "moons").iterdir()
    (tmp_path / "cut" / "cwd").rmdir()
    run_cli([*args, "trainer.max_epochs=3", f"ckpt_path={cut}"], tmp_path / "cut")
    assert [p.name for p in (root / "moons").iterdir()] == [cut.name]  # resumed in place

    a = checkpoint_tensors(whole / "checkpoints" / "last.ckpt")
    b = checkpoint_tensors(cut / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and any(k.endswith("exp_avg_sq") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    whole_scalars, cut_scalars = read_scalars(whole), read_scalars(cut)
    for tag, values in whole_scalars.items():
        if tag.startswith((*FAMILIES, "train/")):
            assert cut_scalars[tag] == values, tag


def test_fsdp_config_is_checked_before_training(make_cfg):
    """Values trainer=fsdp cannot run with are refused before any process starts, naming the key
    and what is allowed; tensor parallelism is refused."""
    refused = {
        "trainer.strategy.tensor_parallel_size=2": "trainer.strategy.tensor_parallel_size=2 is"
        " not allowed: expected 1: tensor parallelism is not supported",
        "trainer.strategy.save_distributed_checkpoint=true": "trainer.strategy."
        "save_distributed_checkpoint=True is not allowed: expected false",
        "trainer.strategy.data_parallel_size=3": "trainer.strategy.data_parallel_size=3 but"
        " trainer.devices=2 x trainer.num_nodes=1 processes each hold a shard: use"
        " trainer.strategy.data_parallel_size=2",
        "trainer.strategy._target_=lightning.pytorch.strategies.DDPStrategy": "trainer.strategy."
        "_target_='lightning.pytorch.strategies.DDPStrategy' is not allowed: expected one of"
        " ['lightning.pytorch.strategies.ModelParallelStrategy']",
        "trainer.devices=auto": "trainer.devices='auto' but trainer=fsdp needs a number",
    }
    for override, message in refused.items():
        with pytest.raises(ConfigError) as error:
            check_config(make_cfg(*FSDP, override))
        assert str(error.value).startswith(message), (override, str(error.value))
    assert check_config(make_cfg(*FSDP)) is None


@pytest.mark.slow
def test_fsdp_tutorial_raises_the_single_process_stall_alert(tmp_path, make_cfg):
    """The tutorial's network (fc2 has one row: rank 1 holds none of it) stalls at step 599:
    under FSDP the same alert, quoting the same loss, and the same final gradient norm."""
    args = ["trainer.max_epochs=1000", "print_every=0"]
    root, output = run_cli([*args, *FSDP], tmp_path)
    (run_dir,) = (root / "xor").iterdir()
    fsdp_alerts = json.loads((run_dir / "gradients.json").read_text())["alerts"]
    cfg = make_cfg(*args)
    single_metrics = train(cfg)
    single_alerts = json.loads(Path(cfg.paths.output_dir, "gradients.json").read_text())["alerts"]
    assert [(alert["step"], alert["kind"]) for alert in fsdp_alerts] == [(599, "stall")]
    assert fsdp_alerts == single_alerts
    assert output.count("ALERT GradientMonitor:") == 1  # rank zero alone prints it
    fsdp_metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("grad_norm/total", "train/loss"):
        assert math.isclose(fsdp_metrics[key], single_metrics[key], rel_tol=1e-5), key
