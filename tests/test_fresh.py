"""FreshGradients: what ``.grad`` holds beyond the logging step's own backward, against plain
PyTorch's arithmetic on the same tensors."""

import torch
from torch import nn

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
    carried, own = fresh.carried_and_fresh(params, None).tolist()
    assert carried == 0.0
    assert abs(own - _norm(_own_gradient([1]))) < 1e-6 * own
    # With the norms already taken (the logging step's measurement), from them alone.
    norms = torch.stack(torch._foreach_norm([p.grad for p in params]))
    assert fresh.carried_and_fresh(params, norms).tolist() == [0.0, float(norms.norm())]


def test_gradients_left_from_earlier_steps_are_measured_as_carried():
    model = _model()
    _backward(model, 0)  # a step without zero_grad after it
    left = [p.grad.clone() for p in model.parameters()]
    fresh = FreshGradients()
    fresh.attach(list(model.parameters()))
    assert len(fresh._handles) == 4
    _backward(model, 1)
    carried, own = fresh.carried_and_fresh(list(model.parameters()), None).tolist()
    assert abs(carried - _norm(left)) < 1e-5 * carried
    assert abs(own - _norm(_own_gradient([1]))) < 1e-5 * own


def test_micro_batches_of_one_step_are_its_own_gradient_not_carried():
    model = _model()
    fresh = FreshGradients()
    for seed in (1, 2, 3):  # attached before each micro-batch's forward, as the monitor does
        fresh.attach(list(model.parameters()))
        _backward(model, seed)
        fresh.detach()
    carried, own = fresh.carried_and_fresh(list(model.parameters()), None).tolist()
    assert carried == 0.0
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
    carried, own = fresh.carried_and_fresh(list(model.parameters()), None).tolist()
    assert abs(carried - float(left.norm())) < 1e-5 * carried
    assert abs(own - _norm(_own_gradient([1]))) < 1e-5 * own
    fresh.clear()
    assert not fresh.attached
