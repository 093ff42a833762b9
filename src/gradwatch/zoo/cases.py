"""The catalogue: broken trainings, each with the diagnosis it should get (and the layer at fault
where one is), and healthy ones that should get none. Every case builds its data in memory and its
module from a seed, and trains a few hundred steps."""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradwatch.data import make_dataset
from gradwatch.zoo.models import BranchedMLP, SmallCNN, SmallTransformer, ZooModule, mlp


@dataclass
class Case:
    """One training of the zoo.

    Attributes:
        name: what it is, in a few words.
        expected: the alert kind it should get; None for a healthy run (no alert at all).
        layer: the layer (or parameter) the alert should name, where one is at fault.
        build: seed -> (module, (x, y) in memory, batch size or None for the full batch).
        steps: optimizer steps to train.
        fp16: trains in fp16 mixed precision with a GradScaler (on CUDA where there is one,
            else with CPU autocast).
        precision: Lightning's ``precision`` otherwise (``"bf16-true"``: bfloat16 weights).
        fast: short enough for ``make test``.
    """

    name: str
    expected: str | None
    layer: str | None
    build: Callable[[], tuple[ZooModule, tuple[Tensor, Tensor], int | None]]
    steps: int = 300
    fp16: bool = False
    precision: str | None = None
    fast: bool = True


def sgd(lr: float, momentum: float = 0.0):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


def adam(lr: float):
    return lambda params: torch.optim.Adam(params, lr=lr)


def moons(n: int = 512, noise: float = 0.1) -> tuple[Tensor, Tensor]:
    return make_dataset("moons", n, noise, seed=0)


def xor() -> tuple[Tensor, Tensor]:
    return make_dataset("xor", 4, 0.0, seed=0)


def bars(n: int = 512) -> tuple[Tensor, Tensor]:
    """1x8x8 images of one horizontal (class 0) or vertical (class 1) bar, with noise."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    pos = torch.randint(0, 8, (n,), generator=gen)
    x = 0.1 * torch.randn(n, 1, 8, 8, generator=gen)
    for i in range(n):
        if y[i] == 0:
            x[i, 0, pos[i], :] += 1.0
        else:
            x[i, 0, :, pos[i]] += 1.0
    return x, y


def sequences(n: int = 512) -> tuple[Tensor, Tensor]:
    """Token sequences of length 8 over 16 tokens; class 1 when token 0 occurs in them."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 16, (n, 8), generator=gen)
    y = torch.arange(n) % 2
    where = torch.randint(0, 8, (n,), generator=gen)
    ids[y == 1, where[y == 1]] = 0
    return ids, y


def seeded(seed: int = 0):
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Broken
# ----------------------------------------------------------------------------------------------


def lr_too_small():
    # The tutorial: 2-2-1 sigmoid MLP, MSE, SGD at lr 0.01 on XOR's four points.
    seeded()
    return ZooModule(mlp([2, 2, 1], "sigmoid"), "mse", sgd(0.01)), xor(), None


def lr_too_large():
    seeded()
    return ZooModule(mlp([2, 32, 32, 1], "tanh"), "bce", sgd(5.0)), moons(), 64


def exploding_init():
    # A deep ReLU MLP whose weights start 4x He's scale: each layer multiplies the signal by ~4.
    seeded()
    net = mlp([2] + [64] * 6 + [1], "relu")
    for layer in net.layers:
        nn.init.normal_(layer.weight, std=4 * math.sqrt(2 / layer.in_features))
    return ZooModule(net, "bce", sgd(1e-5)), moons(), 64


def vanishing_depth():
    # experiment=vanishing: 10 hidden sigmoid layers of 16, SGD at lr 0.01.
    seeded()
    net = mlp([2] + [16] * 10 + [1], "sigmoid")
    return ZooModule(net, "bce", sgd(0.01)), moons(), None


def saturated():
    # tanh units driven to +-1 by weights 100x too large.
    seeded()
    net = mlp([2, 32, 32, 1], "tanh")
    with torch.no_grad():
        net.fc1.weight.mul_(100.0)
        net.fc1.bias.mul_(100.0)
    return ZooModule(net, "bce", sgd(0.05)), moons(), 64


def dead_relu():
    # A large negative bias: fc1's ReLUs never fire.
    seeded()
    net = mlp([2, 32, 32, 1], "relu")
    nn.init.constant_(net.fc1.bias, -10.0)
    return ZooModule(net, "bce", sgd(0.05)), moons(), 64


def symmetric():
    # Every weight one constant: fc1's units compute the same function, forever.
    seeded()
    net = mlp([2, 32, 1], "tanh")
    for layer in net.layers:
        nn.init.constant_(layer.weight, 0.1)
        nn.init.zeros_(layer.bias)
    return ZooModule(net, "bce", sgd(0.1)), moons(), 64


def no_gradient():
    seeded()
    return ZooModule(BranchedMLP(), "bce", sgd(0.1)), moons(), 64


def not_optimized():
    # configure_optimizers passes the head only: fc1 gets gradients nobody applies.
    seeded()
    module = ZooModule(
        mlp([2, 32, 1], "tanh"), "bce", adam(0.01), params=lambda n: n.fc2.parameters()
    )
    return module, moons(), 64


def nan_loss():
    # Binary cross-entropy by hand: log(0) once the sigmoid rounds to 0 or 1.
    seeded()
    return ZooModule(mlp([2, 32, 1], "relu"), "bce_by_hand", sgd(5.0)), moons(), 64


def inf_input():
    seeded()
    x, y = moons()
    x[7, 0] = math.inf
    return ZooModule(mlp([2, 32, 1], "relu"), "bce", sgd(0.1)), (x, y), 64


def no_zero_grad():
    seeded()
    return ZooModule(mlp([2, 32, 1], "tanh"), "bce", sgd(0.01), zero_grad=False), moons(), 64


def summed_loss():
    # The loss summed over a batch of 1024: the step is 1024 times the one the lr was chosen for.
    seeded()
    return ZooModule(mlp([2, 32, 32, 1], "tanh"), "bce_summed", sgd(0.05)), moons(4096), 1024


def shuffled_labels():
    seeded()
    x, y = moons(2048)
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    return ZooModule(mlp([2, 32, 32, 1], "tanh"), "bce", adam(0.01)), (x, y), 128


def lr_zero_group():
    # Two param groups, the first layer's at lr 0 (a schedule that reached 0, a typo): its
    # gradients are computed at every step and never applied.
    seeded()

    def groups(net: nn.Module) -> list[dict]:
        return [{"params": net.fc1.parameters(), "lr": 0.0}, {"params": net.fc2.parameters()}]

    return ZooModule(mlp([2, 32, 1], "tanh"), "bce", sgd(0.1), params=groups), moons(), 64


def fp16_overflow():
    # Inputs in the thousands through a layer with weights 100x the default: fc1's outputs pass
    # fp16's largest value (65504), the loss is Inf at every step, and the GradScaler skips
    # every step, halving its scale each time.
    seeded()
    net = mlp([2, 64, 1], "relu")
    with torch.no_grad():
        net.fc1.weight.mul_(100.0)
    x, y = moons()
    return ZooModule(net, "bce", sgd(0.01)), (1000 * x, y), 64


# ----------------------------------------------------------------------------------------------
# Healthy
# ----------------------------------------------------------------------------------------------


def xor_adam():
    seeded()
    return ZooModule(mlp([2, 2, 1], "sigmoid"), "mse", adam(0.05)), xor(), None


def moons_relu():
    seeded()
    return ZooModule(mlp([2, 32, 32, 1], "relu"), "bce", adam(0.01)), moons(), 64


def moons_slow_adam():
    # Adam at lr 1e-4: slow (the loss falls a few percent in 300 steps), but learning.
    seeded()
    return ZooModule(mlp([2, 32, 32, 1], "relu"), "bce", adam(1e-4)), moons(), 64


def spiral_tanh():
    seeded()
    data = make_dataset("spiral", 768, 0.0, seed=0)
    return ZooModule(mlp([2, 64, 64, 3], "tanh"), "ce", adam(0.01)), data, 64


def cnn():
    seeded()
    return ZooModule(SmallCNN(), "ce", adam(0.01)), bars(), 64


def transformer():
    seeded()
    return ZooModule(SmallTransformer(), "ce", adam(3e-3)), sequences(), 64


def vanishing_fixed():
    # The vanishing network with ReLU and He initialisation instead of sigmoid.
    seeded()
    net = mlp([2] + [16] * 10 + [1], "relu")
    for layer in net.layers:
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    return ZooModule(net, "bce", sgd(0.01)), moons(), None


CASES = [
    Case("lr too small (the tutorial)", "stall", None, lr_too_small, steps=500),
    Case("lr too large", "diverging", None, lr_too_large),
    Case("exploding by initial scale", "exploding", None, exploding_init, fast=False),
    Case("vanishing by depth (sigmoid)", "vanishing", "fc1", vanishing_depth),
    Case("saturated tanh (large weights)", "saturated_units", "fc1", saturated),
    Case("dead ReLUs (negative bias)", "dead_units", "fc1", dead_relu),
    Case("symmetric units (constant init)", "symmetric_units", "fc1", symmetric),
    Case("detached branch, unused module", "no_gradient", "branch.weight", no_gradient),
    Case("parameter in no optimizer", "not_optimized", "fc1.weight", not_optimized),
    Case("NaN from the loss (log of 0)", "nonfinite", None, nan_loss),
    Case("Inf in the input", "nonfinite", None, inf_input),
    Case("no zero_grad (manual optimization)", "accumulating", None, no_zero_grad),
    Case("loss summed, not averaged", "diverging", None, summed_loss),
    Case("shuffled labels", "no_signal", None, shuffled_labels, steps=500),
    Case("fp16 overflow", "skipped_steps", None, fp16_overflow, fp16=True),
    # The tutorial with bfloat16 weights: its steps, 1e-4 of a weight, round away.
    Case(
        "the tutorial in bf16 weights", "no_update", None, lr_too_small, 500, precision="bf16-true"
    ),
    Case("a param group at lr 0", "no_update", "fc1", lr_zero_group),
    # The healthy ReLU MLP below in float16 weights: Adam's eps of 1e-8 is 0 in float16.
    Case("moons, ReLU MLP in fp16 weights", "nonfinite", None, moons_relu, precision="16-true"),
    # The slow but healthy Adam below, in bfloat16 weights: its steps of about 1e-4 mostly round
    # away (bfloat16 numbers near 0.5 are 1/256 apart; a step under half that changes nothing).
    Case(
        "moons, Adam at lr 1e-4 in bf16 weights",
        "no_update",
        None,
        moons_slow_adam,
        500,
        precision="bf16-true",
    ),
    Case("XOR with Adam", None, None, xor_adam, steps=500),
    Case("moons, ReLU MLP", None, None, moons_relu, steps=500),
    Case("moons, ReLU MLP in fp16", None, None, moons_relu, steps=500, fp16=True),
    Case("moons, ReLU MLP in bf16 weights", None, None, moons_relu, 500, precision="bf16-true"),
    # Converged as far as bfloat16 weights allow (XOR's loss ends at 1e-5 of its first, the CNN's
    # below at 1e-3), where every step left rounds away: convergence, not lost updates.
    Case("XOR with Adam in bf16 weights", None, None, xor_adam, 500, precision="bf16-true"),
    Case("moons, Adam at lr 1e-4 (slow)", None, None, moons_slow_adam, steps=500),
    Case("spiral, tanh MLP", None, None, spiral_tanh, steps=500, fast=False),
    Case("CNN on bars", None, None, cnn, steps=500, fast=False),
    Case("CNN on bars in bf16 weights", None, None, cnn, 500, precision="bf16-true", fast=False),
    Case("transformer on sequences", None, None, transformer, steps=500, fast=False),
    Case("vanishing fixed (ReLU, He init)", None, None, vanishing_fixed, steps=500),
]
