"""FreshGradients: what ``.grad`` holds beyond the logging step's own backward, against plain
PyTorch's arithmetic on the same tensors."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradwatch.monitor import GradientMonitor
from gradwatch.monitor.fresh import FreshGradients


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def _backward(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model(torch.randn(5, 3, generator=gen)).pow(2).mean().backward()


def _own_gradient(seeds: list[int]) -> list[torch.Tensor]:
    """The gradients of those backwards alone, from a fresh copy of the model."""
    model = _model()
    for seed in seeds:
        _backward(model, seed)
    return [p.grad.clone() for p in model.parameters()]


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.cat([t.flatten() for t in tensors]).norm())


def test_a_step_that_begins_without_gradients_carries_nothing_and_hooks_nothing():
    model = _model()
    fresh = FreshGradients()
    fresh.attach(list(model.parameters()))
    assert fresh._handles == []  # every .grad is None: nothing to follow
    _backward(model, 1)
    params = list(model.parameters())
    assert fresh.attached
    assert fresh.carried_and_fresh(params) is None  # nothing carried, nothing to measure


def test_gradients_left_from_earlier_steps_are_measured_as_carried():
    model = _model()
    _backward(model, 0)  # a step without zero_grad after it
    left = [p.grad.clone() for p in model.parameters()]
    fresh = FreshGradients()
    fresh.attach(list(model.parameters()))
    assert len(fresh._handles) == 4
    _backward(model, 1)
    carried, own = fresh.carried_and_fresh(list(model.parameters())).tolist()
    assert abs(carried - _norm(left)) < 1e-5 * carried
    assert abs(own - _norm(_own_gradient([1]))) < 1e-5 * own


def test_micro_batches_of_one_step_are_its_own_gradient_not_carried():
    model = _model()
    fresh = FreshGradients()
    for seed in (1, 2, 3):  # attached before each micro-batch's backward, as the monitor does
        fresh.attach(list(model.parameters()))
        assert fresh._handles == []  # clean at the first: the later ones add to its own
        _backward(model, seed)
        fresh.detach()
    assert fresh.carried_and_fresh(list(model.parameters())) is None


def test_micro_batches_on_top_of_a_carried_gradient_count_as_the_step_s_own():
    model = _model()
    _backward(model, 0)  # a step without zero_grad after it
    left = [p.grad.clone() for p in model.parameters()]
    fresh = FreshGradients()
    for seed in (1, 2, 3):
        fresh.attach(list(model.parameters()))
        _backward(model, seed)
        fresh.detach()
    carried, own = fresh.carried_and_fresh(list(model.parameters())).tolist()
    assert abs(carried - _norm(left)) < 1e-5 * carried
    assert abs(own - _norm(_own_gradient([1, 2, 3]))) < 1e-5 * own


def test_one_parameter_clean_and_one_carrying():
    model = _model()
    _backward(model, 0)
    left = model[2].weight.grad.clone()
    for p in model.parameters():
        if p is not model[2].weight:
            p.grad = None  # only the last weight keeps what it had
    fresh = FreshGradients()
    fresh.attach(list(model.parameters()))
    assert len(fresh._handles) == 1
    _backward(model, 1)
    carried, own = fresh.carried_and_fresh(list(model.parameters())).tolist()
    assert abs(carried - float(left.norm())) < 1e-5 * carried
    assert abs(own - _norm(_own_gradient([1]))) < 1e-5 * own
    fresh.clear()
    assert not fresh.attached


class _Fixed(pl.LightningModule):
    """One fixed batch, SGD at lr 0 (the weights never move, so every backward's gradient is
    the same g); ``manual``: manual optimization that never calls zero_grad."""

    def __init__(self, manual: bool) -> None:
        super().__init__()
        self.net = _model()
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        loss = self.net(batch[0]).pow(2).mean()
        if self.automatic_optimization:
            return loss
        self.manual_backward(loss)
        self.optimizers().step()  # and no zero_grad: .grad grows by g each step
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(manual: bool, monitor: GradientMonitor, tmp_path: Path) -> None:

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    trainer = pl.Trainer(
        max_steps=6,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
        accelerator="cpu",
    )
    trainer.fit(_Fixed(manual), DataLoader(TensorDataset(x), batch_size=5))


def test_in_lightning_zero_grad_leaves_nothing_to_hook_and_nothing_carried(monkeypatch, tmp_path):
    # Lightning zeroes between the forward and the backward: the check follows from there, so
    # a training step that zeroes needs no hook and no copy of any gradient.
    def no_hooks(self, key):  # noqa: ANN001, ANN202
        raise AssertionError("a hook on a parameter whose .grad was zeroed to None")

    monkeypatch.setattr(FreshGradients, "_adder", no_hooks)
    monitor = GradientMonitor(log_every_n_steps=3)
    _fit(manual=False, monitor=monitor, tmp_path=tmp_path)
    carried = [o.carried_gradient for o in monitor.health.observed.observations]
    assert carried == [0.0, 0.0]


def test_in_lightning_a_step_without_zero_grad_carries_the_earlier_steps(tmp_path):
    # .grad at step s (from 0) holds (s + 1) g, of which s g were carried: the share is s.
    monitor = GradientMonitor(log_every_n_steps=3)
    _fit(manual=True, monitor=monitor, tmp_path=tmp_path)
    carried = [o.carried_gradient for o in monitor.health.observed.observations]
    assert [o.step for o in monitor.health.observed.observations] == [2, 5]
    assert carried == [pytest.approx(2.0, rel=1e-5), pytest.approx(5.0, rel=1e-5)]
