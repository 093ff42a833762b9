"""Mini-batch runs resume bit for bit, mid-epoch included: the data order travels in the checkpoint.

The fast tests stop and resume in-process through `train(cfg)`; the slow ones are the command
line's SIGTERM and hard kill, as in test_resume.py.
"""

import itertools
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import compose_config, wait_for

import gradwatch.train
from gradwatch.checkpoints import RunCheckpoint
from gradwatch.data import TensorBatches
from gradwatch.train import train

# 800 training rows (moons holds 200 out): 300 a batch is 3 steps an epoch, the last one short.
MOONS = ["data=moons", "model.layer_sizes=[2,16,1]", "model.loss=bce_with_logits"]
MOONS += ["print_every=0", "logger=none"]
NOT_RESUMABLE = "dataloader is not resumable"


class StopAt(pl.Callback):
    """Asks the run to stop before step `step` (as SIGTERM would): last.ckpt is saved at step
    `step + 1`, the run ends with Lightning's interrupt (SystemExit)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            checkpoint = next(c for c in trainer.callbacks if isinstance(c, RunCheckpoint))
            checkpoint.stop_signal = signal.SIGTERM


class Killed(Exception):
    pass


class DieAt(pl.Callback):
    """Dies before step `step` as a hard kill would: no checkpoint, the last periodic one stays."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise Killed


def fit(run_dir: Path, overrides: list[str], callback: pl.Callback | None = None) -> dict:
    """`train(cfg)` into `run_dir`, with `callback` added to the Trainer's; last.ckpt's contents."""
    original = gradwatch.train.build_trainer
    extra = (callback,) if callback else ()

    def with_callback(*args, extra_callbacks=(), **kwargs):
        return original(*args, extra_callbacks=(*extra_callbacks, *extra), **kwargs)

    gradwatch.train.build_trainer = with_callback
    sigint = signal.getsignal(signal.SIGINT)
    try:
        train(compose_config(overrides, run_dir))
    finally:
        gradwatch.train.build_trainer = original
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores Ctrl-C on its way out of a stop
    return torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)


def assert_same_weights(resumed: dict, uninterrupted: dict) -> None:
    assert resumed["global_step"] == uninterrupted["global_step"]
    assert resumed["state_dict"].keys() == uninterrupted["state_dict"].keys()
    for name, value in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name


def resume(run_dir: Path, overrides: list[str]) -> dict:
    """Resume `run_dir` with `overrides`; no warning that the dataloader cannot resume."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final = fit(run_dir, [*overrides, f"ckpt_path={run_dir}"])
    assert not [w for w in caught if NOT_RESUMABLE in str(w.message)]
    return final


@pytest.mark.parametrize(
    ("batch_size", "epochs", "stop_before", "saved_at"),
    [
        (300, 60, 97, 98),  # 3 steps an epoch: 98 is the 2nd step of the 33rd epoch
        (300, 60, 98, 99),  # the 33rd epoch's last step: an epoch boundary
        (7, 4, 300, 301),  # 115 steps an epoch, the last of 2 rows: 301 is the 71st of the 3rd
    ],
)
def test_a_stopped_run_resumes_bit_for_bit(tmp_path, batch_size, epochs, stop_before, saved_at):
    run = [*MOONS, f"data.batch_size={batch_size}", f"trainer.max_epochs={epochs}"]
    run += ["trainer.check_val_every_n_epoch=2"]
    uninterrupted = fit(tmp_path / "uninterrupted", run)
    with pytest.raises(SystemExit):
        fit(tmp_path / "stopped", run, StopAt(stop_before))
    stopped = torch.load(tmp_path / "stopped/checkpoints/last.ckpt", weights_only=True)
    assert stopped["global_step"] == saved_at
    assert_same_weights(resume(tmp_path / "stopped", run), uninterrupted)


@pytest.mark.parametrize("batch_size", [300, 400])
def test_a_killed_run_resumes_from_its_periodic_checkpoint_bit_for_bit(tmp_path, batch_size):
    # A checkpoint every 36 steps: at an epoch boundary for 2 and for 3 steps an epoch.
    run = [*MOONS, f"data.batch_size={batch_size}", "trainer.max_epochs=60"]
    run += ["trainer.check_val_every_n_epoch=5", "callbacks.checkpoint.every_n_train_steps=36"]
    uninterrupted = fit(tmp_path / "uninterrupted", run)
    with pytest.raises(Killed):
        fit(tmp_path / "killed", run, DieAt(80))
    kept = torch.load(tmp_path / "killed/checkpoints/last.ckpt", weights_only=True)
    assert kept["global_step"] == 72
    assert_same_weights(resume(tmp_path / "killed", run), uninterrupted)


def test_a_finished_run_trained_further_matches_one_run_of_that_length(tmp_path):
    """last.ckpt of a finished run is saved after its last epoch: Lightning does not give a
    loader its state back then, the datamodule does."""
    run = [*MOONS, "data.batch_size=300", "trainer.check_val_every_n_epoch=5"]
    uninterrupted = fit(tmp_path / "uninterrupted", [*run, "trainer.max_epochs=40"])
    fit(tmp_path / "extended", [*run, "trainer.max_epochs=20"])
    assert_same_weights(
        resume(tmp_path / "extended", [*run, "trainer.max_epochs=40"]), uninterrupted
    )


def test_a_checkpoint_without_data_state_still_resumes(tmp_path):
    """A checkpoint written before the data order was saved resumes as it did then."""
    run = [*MOONS, "data.batch_size=300", "trainer.max_epochs=20"]
    with pytest.raises(SystemExit):
        fit(tmp_path / "old", run, StopAt(30))  # saved at step 31, mid-epoch
    path = tmp_path / "old/checkpoints/last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["loops"]["fit_loop"]["state_dict"].pop("combined_loader", None)
    checkpoint.pop("InMemoryDataModule", None)
    torch.save(checkpoint, path)
    final = fit(tmp_path / "old", [*run, f"ckpt_path={tmp_path / 'old'}"])
    assert final["global_step"] == 60


def draw(batches: TensorBatches, n: int) -> list[torch.Tensor]:
    """The first `n` batches' features, one `iter()` an epoch as Lightning asks for them; the
    last epoch is left where the n-th batch was taken."""
    epochs = itertools.chain.from_iterable(itertools.repeat(batches))
    return [batch_x for batch_x, _ in itertools.islice(epochs, n)]


@pytest.mark.parametrize("taken", [0, 1, 4, 6])  # 4 batches an epoch: 6 is within the 2nd
def test_every_rank_continues_its_batches_from_a_saved_state(taken):
    x, y = torch.arange(20.0).unsqueeze(1), torch.arange(20)  # 6 a batch: 6, 6, 6 and 2 rows
    whole = draw(TensorBatches(x, y, 6, shuffle=True, seed=3), 12)
    for world_size in (1, 2):
        ranks = []
        for rank in range(world_size):
            before = TensorBatches(x, y, 6, True, seed=3, rank=rank, world_size=world_size)
            head = draw(before, taken)
            # Another seed: the order comes from the state alone.
            after = TensorBatches(x, y, 6, True, seed=99, rank=rank, world_size=world_size)
            after.load_state_dict(before.state_dict())
            ranks.append(head + draw(after, 12 - taken))
        # The ranks' rows of each batch together are the single process's batch.
        for i, batch in enumerate(whole):
            assert torch.equal(
                torch.cat([r[i] for r in ranks]).sort(0).values, batch.sort(0).values
            )
            assert torch.equal(ranks[0][i], batch[::world_size])


def test_validation_batches_are_not_shuffled():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    batches = TensorBatches(x, y, 4, shuffle=False, seed=0)
    assert torch.equal(torch.cat(draw(batches, 6)), torch.cat([x, x]))  # 3 batches an epoch


# The command line, killed for real.
SLOW_RUN = [*MOONS, "trainer.check_val_every_n_epoch=10"]


def start(args: list[str], root: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "gradwatch.train", *args, f"paths.root={root}"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def interrupt_and_resume(run: list[str], signum: int, root: Path) -> tuple[dict, dict]:
    """Start `run`, send `signum` once its first periodic checkpoint is written, resume it: the
    checkpoint it stopped with and the resumed run's last one."""
    process = start(run, root)
    ckpt = wait_for("moons/*/checkpoints/last.ckpt", root)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0, output
    stopped = torch.load(ckpt, weights_only=True)
    run_dir = ckpt.parent.parent
    resumed = start([*run, f"ckpt_path={run_dir}"], root)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert NOT_RESUMABLE not in output
    assert list((root / "moons").iterdir()) == [run_dir]  # the same run, continued
    return stopped, torch.load(ckpt, weights_only=True)


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_is_bit_for_bit(tmp_path):
    # 30 a batch: 27 steps an epoch (the last of 20 rows), so the stop (at the step after the
    # signal) is mid-epoch 26 times in 27; the first periodic checkpoint (200) is mid-epoch too.
    run = [*SLOW_RUN, "data.batch_size=30", "trainer.max_epochs=30"]
    run += ["callbacks.checkpoint.every_n_train_steps=200"]
    uninterrupted = fit(tmp_path / "uninterrupted", run)
    stopped, resumed = interrupt_and_resume(run, signal.SIGTERM, tmp_path / "runs")
    assert 200 <= stopped["global_step"] < 30 * 27
    assert_same_weights(resumed, uninterrupted)


@pytest.mark.slow
def test_hard_kill_at_an_epoch_boundary_then_resume_is_bit_for_bit(tmp_path):
    # 400 a batch: 2 steps an epoch, so every periodic checkpoint ends an epoch.
    run = [*SLOW_RUN, "data.batch_size=400", "trainer.max_epochs=800"]
    run += ["callbacks.checkpoint.every_n_train_steps=200"]
    uninterrupted = fit(tmp_path / "uninterrupted", run)
    stopped, resumed = interrupt_and_resume(run, signal.SIGKILL, tmp_path / "runs")
    assert stopped["global_step"] % 200 == 0 and 0 < stopped["global_step"] < 800 * 2
    assert_same_weights(resumed, uninterrupted)


DDP_FIT = """
import sys
import lightning.pytorch as pl
from gradwatch.checkpoints import RunCheckpoint
from gradwatch.data import InMemoryDataModule
from gradwatch.model import MLPModule

folder, steps, ckpt_path = sys.argv[1], int(sys.argv[2]), sys.argv[3:] or [None]
pl.seed_everything(0)
trainer = pl.Trainer(
    accelerator="cpu", strategy="ddp", devices=2, max_steps=steps, logger=False,
    callbacks=[RunCheckpoint(folder)], enable_checkpointing=False, enable_progress_bar=False,
    enable_model_summary=False, check_val_every_n_epoch=1, num_sanity_val_steps=0,
)
data = InMemoryDataModule("moons", batch_size=40, n_samples=200, noise=0.1, val_fraction=0.2)
model = MLPModule([2, 8, 2], loss="cross_entropy")
trainer.fit(model, datamodule=data, ckpt_path=ckpt_path[0], weights_only=True)
"""


@pytest.mark.slow
def test_ddp_resumes_mid_epoch_bit_for_bit(tmp_path):
    # Two CPU processes, 4 steps an epoch of 20 rows each: the first run ends at step 6, in the
    # 2nd epoch, and the second goes on from its last.ckpt to step 12.
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_FIT)

    def run(*args) -> dict:
        command = [sys.executable, str(script), *map(str, args)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert NOT_RESUMABLE not in done.stderr
        return torch.load(Path(args[0], "last.ckpt"), weights_only=True)

    uninterrupted = run(tmp_path / "whole", 12)
    assert run(tmp_path / "split", 6)["global_step"] == 6
    resumed = run(tmp_path / "split", 12, tmp_path / "split/last.ckpt")
    assert_same_weights(resumed, uninterrupted)
