"""The diagnosis inside a training: activation statistics recomputed by hand and taken on logging
steps only, and each alert one object in the console warning, TensorBoard's text and
`gradients.json`, with its kind, layers, step, evidence and fix."""

import json
import warnings

import pytest
import torch
from test_monitor import Module, fit, histograms, read_events, scalars
from torch import nn

from gradwatch.monitor import GradientAlert, GradientMonitor, activations
from gradwatch.monitor.activations import STATS, ActivationProbe, unit_stats


def stats(x, eps=1e-3):
    return dict(
        zip(("units", "dead", "saturated", "alike"), unit_stats(x, eps).tolist(), strict=True)
    )


def test_unit_stats_by_hand():
    # 4 samples x 4 units: unit 0 dead, units 1 and 2 copies, unit 3 its own (ReLU outputs).
    x = torch.tensor(
        [[0.0, 1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 3.0], [0.0, 0.5, 0.5, 1.0], [0.0, 0.0, 0.0, 2.0]]
    )
    assert stats(x) == {"units": 4.0, "dead": 0.25, "saturated": 0.0, "alike": 0.5}
    # tanh outputs: two units at +-1 on every sample, one in the middle; nothing exactly 0.
    t = torch.tensor([[1.0, -0.9999, 0.3], [0.99995, -1.0, -0.2], [1.0, -1.0, 0.1]])
    assert stats(t)["saturated"] == pytest.approx(2 / 3)
    # Sigmoid outputs near 0 and 1 are saturated; ReLU zeros are dead, never saturated.
    s = torch.tensor([[1e-5, 0.5], [2e-5, 0.4], [1e-6, 0.6]])
    assert stats(s)["saturated"] == 0.5
    r = torch.tensor([[0.0, 0.5], [0.0, 0.4], [0.0, 0.6]])
    assert stats(r)["saturated"] == 0.0 and stats(r)["dead"] == 0.5


@pytest.mark.parametrize("stacked_values", [activations.STACKED_VALUES, 1, 400])
def test_layers_of_one_shape_are_measured_together_as_each_alone(monkeypatch, stacked_values):
    """The probe measures layers of one shape in stacks (all of them, one by one, two or three
    at a time): each layer's statistics equal those of its input measured alone, whatever its
    neighbours (dead, copied, saturated)."""
    monkeypatch.setattr(activations, "STACKED_VALUES", stacked_values)
    torch.manual_seed(0)
    widths = [3, 6, 6, 6, 4, 4, 2]
    layers = [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    nn.init.constant_(layers[0].weight, 0.3)  # fc.0: six copies
    nn.init.zeros_(layers[0].bias)
    nn.init.constant_(layers[2].bias, -50.0)  # fc.2: dead
    nn.init.constant_(layers[3].bias, 40.0)  # fc.3: saturated under the sigmoid
    acts = [torch.tanh, torch.relu, torch.relu, torch.sigmoid, torch.relu]
    received = {}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.ModuleList(layers)

        def forward(self, x):
            for k, act in enumerate(acts):
                x = act(self.fc[k](x))
                received[f"fc.{k}"] = x.detach().clone()
            return self.fc[-1](x)

    net = Net()
    probe = ActivationProbe()
    probe.attach(net, {id(p): name for name, p in net.named_parameters()})
    net(torch.rand(32, 3) * 4 - 2).sum().backward()
    probe.detach()
    assert list(probe.stats) == list(received)  # the forward's order
    for layer, x in received.items():
        assert stats(x) == dict(zip(STATS, probe.stats[layer].tolist(), strict=True)), layer
    measured = {
        layer: dict(zip(STATS, v.tolist(), strict=True)) for layer, v in probe.stats.items()
    }
    assert measured["fc.0"]["alike"] == 1.0 and measured["fc.2"]["dead"] == 1.0
    assert measured["fc.3"]["saturated"] == 1.0


class ReluNet(nn.Module):
    """fc1 -> ReLU -> fc2; fc2 notes, at each forward, how many forward pre-hooks it has and
    what it received."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 8)
        self.fc2 = nn.Linear(8, 1)
        self.hooks_seen: list[int] = []
        self.received: list[torch.Tensor] = []

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        self.hooks_seen.append(len(self.fc2._forward_pre_hooks))
        self.received.append(h.detach().clone())
        return self.fc2(h)


def test_activation_statistics_on_logging_steps_only(tmp_path):
    torch.manual_seed(0)
    net = ReluNet()
    trainer, _ = fit(
        tmp_path,
        GradientMonitor(),
        module=lambda: Module(net=net),
        max_epochs=8,
        log_every_n_steps=4,
    )
    # The monitor's hook is there for the forward of the logging steps (3 and 7) only; both are
    # measured: a quarter of fc1's units is dead, the probe's watch share.
    assert stats(net.received[3])["dead"] >= ActivationProbe.watch
    assert net.hooks_seen == [0, 0, 0, 1, 0, 0, 0, 1]
    values = scalars(read_events(trainer.logger.log_dir))
    assert sorted(values["activation/dead/fc1"]) == [3, 7]
    # Under fc1's name: what fc2 received, recomputed.
    for step in (3, 7):
        expected = stats(net.received[step])
        for stat in ("dead", "saturated", "alike"):
            assert values[f"activation/{stat}/fc1"][step] == pytest.approx(expected[stat])
    # The output layer feeds nothing: no statistics of its own.
    assert not [t for t in values if t.startswith("activation/") and t.endswith("/fc2")]


def test_the_probe_measures_every_few_logs_and_every_log_while_a_share_is_high(monkeypatch):
    """Healthy: the first logging step and every ``measure_every``-th; once a layer is mostly
    dead, every logging step, until it recovers. Activation histograms, or several processes
    (whose statistics join one collective): every logging step."""
    torch.manual_seed(0)
    net = ReluNet()
    names = {id(p): name for name, p in net.named_parameters()}
    # Inputs for which fc1's 8 ReLU units all fire, each its own (biases 1, weights in [0.1, 1],
    # inputs in [0, 1]), and for which they are all 0 (biases -10).
    nn.init.uniform_(net.fc1.weight, 0.1, 1.0)
    x = torch.rand(16, 2)

    def measured(probe, biases):
        out = []
        for bias in biases:
            nn.init.constant_(net.fc1.bias, bias)
            probe.attach(net, names)
            net(x)
            probe.detach()
            out.append(bool(probe.stats))
            if probe.stats:  # as the monitor does once the step's transfer has them on the host
                probe.largest_share = max(float(v[1:].max()) for v in probe.stats.values())
            probe.stats = {}
        return out

    probe = ActivationProbe()
    assert probe.measure_every == 4
    every_fourth = [True, False, False, False] * 2 + [True]
    assert measured(probe, [1.0] * 9) == every_fourth
    # Dead from the 13th log on (a measured one): measured at every log from then on.
    assert measured(probe, [1.0] * 3 + [-10.0] * 5) == [False] * 3 + [True] * 5
    # Alive again at the 18th: measured (the 17th was dead), then one in four again (the 21st).
    assert measured(probe, [1.0] * 5) == [True, False, False, True, False]
    assert measured(ActivationProbe(keep_values=True), [1.0] * 3) == [True] * 3
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    assert measured(ActivationProbe(), [1.0] * 3) == [True] * 3


def test_activation_histograms_on_request(tmp_path):
    torch.manual_seed(0)
    net = ReluNet()
    monitor = GradientMonitor(activation_histograms=True, histogram_every_n_steps=4)
    trainer, _ = fit(
        tmp_path, monitor, module=lambda: Module(net=net), max_epochs=8, log_every_n_steps=4
    )
    hists = histograms(read_events(trainer.logger.log_dir))
    assert sorted(hists["activation_hist/fc1"]) == [3, 7]
    h = hists["activation_hist/fc1"][7]
    received = net.received[7]
    assert (h.num, h.min, h.max) == (received.numel(), received.min(), received.max())
    assert h.sum == pytest.approx(received.sum().item(), rel=1e-6)


def test_an_alert_is_one_object_everywhere(tmp_path):
    """A detached branch: the warning carries the diagnosis; TensorBoard's text and
    gradients.json say the same, with the kind."""

    class Branched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(2, 2)
            self.side = nn.Linear(2, 2)
            self.fc2 = nn.Linear(2, 1)

        def forward(self, x):
            return self.fc2(torch.sigmoid(self.fc1(x) + self.side(x).detach()))

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, _ = fit(
            tmp_path, GradientMonitor(), module=lambda: Module(net=Branched()), max_epochs=6
        )
    (warning,) = [w.message for w in record if isinstance(w.message, GradientAlert)]
    assert warning.kind == "no_gradient" and warning.step == 2
    assert warning.layers == ["side.weight", "side.bias"]
    assert warning.evidence == {"logged_steps": 3} and "detach" in warning.fix
    assert str(warning).startswith("GradientMonitor: parameters without any gradient at step 2")
    assert str(warning).endswith(f"[no_gradient]. Fix: {warning.fix}")
    (saved,) = json.loads((tmp_path / "gradients.json").read_text())["alerts"]
    assert saved == {
        "step": 2,
        "kind": "no_gradient",
        "layers": ["side.weight", "side.bias"],
        "message": warning.alert.message,
        "evidence": {"logged_steps": 3},
        "fix": warning.fix,
    }
    (text,) = read_events(trainer.logger.log_dir).Tensors("alerts/text_summary")
    assert text.tensor_proto.string_val[0].decode().startswith("**no_gradient**: parameters")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_activations": "yes"}, "log_activations must be true or false"),
        ({"activation_histograms": 1}, "activation_histograms must be true or false"),
        ({"saturation_eps": 0}, r"saturation_eps must be a number in \(0, 0.5\)"),
        ({"dead_fraction": 2}, r"dead_fraction must be a number in \(0, 1\]"),
        ({"symmetric_fraction": 0}, r"symmetric_fraction must be a number in \(0, 1\]"),
        ({"activation_patience": 0}, "activation_patience must be an int >= 1"),
    ],
)
def test_activation_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientMonitor(**kwargs)
