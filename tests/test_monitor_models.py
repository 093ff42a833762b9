"""GradientMonitor on models other than the tutorial's (issue 13, item 7): sparse embeddings,
manual optimization, parameters without gradients, names that could collide, optimizers that step
on different steps. Every logged number is checked against the same quantity computed in plain
PyTorch from gradients and weights recorded at that step, never with the monitor's own helpers;
the health rules are checked on a history built by hand."""

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradwatch.monitor import GradientAlert, GradientMonitor
from gradwatch.monitor.health import Health, Observation, Thresholds

X_XOR = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
Y_XOR = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
# The tag families a step's values are written under (histograms aside).
FAMILIES = ("grad_norm/", "grad_nonfinite/", "weight_norm/", "update_ratio/")


# ----------------------------------------------------------------------------------------------
# Helpers: a Trainer writing to tmp_path, the event file read back, gradients recorded per step
# ----------------------------------------------------------------------------------------------


def fit(tmp_path, module, monitor, loader, extra_callbacks=(), **kwargs):
    kwargs.setdefault("max_epochs", 1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[monitor, *extra_callbacks],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
        **kwargs,
    )
    trainer.fit(module, loader)
    return trainer


def read_events(log_dir):
    acc = EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def scalars_by_step(acc):
    """{step: {tag: value}} of every scalar in the run."""
    out: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            out.setdefault(e.step, {})[tag] = e.value
    return out


def histograms(acc):
    return {
        t: {e.step: e.histogram_value for e in acc.Histograms(t)} for t in acc.Tags()["histograms"]
    }


def monitored(values):
    """The step's values in the monitor's scalar families."""
    return {t: v for t, v in values.items() if t.startswith(FAMILIES)}


def gradient_alerts(record, kind=None):
    out = [str(w.message) for w in record if issubclass(w.category, GradientAlert)]
    return [m for m in out if kind is None or kind in m]


def norm(tensors):
    """The L2 norm of tensors together (dense or sparse), in float64."""
    tensors = [t.to_dense() if t.layout != torch.strided else t for t in tensors]
    if not tensors:
        return 0.0
    return torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors])).item()


class StepRecorder(pl.Callback):
    """Per batch, as the optimizer gets them: each parameter's gradient (``None`` if it has none)
    and weight before the step (``on_before_optimizer_step``), and its weight after the step.
    Parameters are named as ``named_parameters`` names them, without ``prefix``."""

    def __init__(self, prefix=""):
        self.prefix = prefix
        self.steps: list[dict] = []

    def _named(self, pl_module):
        return {n.removeprefix(self.prefix): p for n, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({"grads": {}, "before": {}, "after": {}})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = self.steps[-1]
        for n, p in self._named(pl_module).items():
            step["grads"][n] = None if p.grad is None else p.grad.detach().clone()
            step["before"][n] = p.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1]["after"] = {n: p.detach().clone() for n, p in self._named(pl_module).items()}


def expected_scalars(step, layer_of, layer_tags, total_tag="total"):
    """Every value one optimizer's logging step should write, by tag, recomputed from a
    :class:`StepRecorder` step: ``layer_of`` maps a parameter name to its layer, ``layer_tags`` a
    layer to the tag it is expected under. Parameters without a gradient get no gradient tags; a
    healthy step (every gradient finite) gets no ``grad_nonfinite/`` tags."""
    grads, before, after = step["grads"], step["before"], step["after"]
    expected = {}
    layers: dict[str, list[str]] = {}
    for n in before:
        layers.setdefault(layer_of(n), []).append(n)
        expected[f"weight_norm/{n}"] = norm([before[n]])
        if grads[n] is not None:
            expected[f"grad_norm/{n}"] = norm([grads[n]])
    with_grad = [g for g in grads.values() if g is not None]
    for layer, names in layers.items():
        tag = layer_tags[layer]
        layer_grads = [grads[n] for n in names if grads[n] is not None]
        if layer_grads:
            expected[f"grad_norm/{tag}"] = norm(layer_grads)
        delta = norm([after[n] - before[n] for n in names])
        expected[f"update_ratio/{tag}"] = delta / norm([before[n] for n in names])
    if with_grad:
        expected[f"grad_norm/{total_tag}"] = norm(with_grad)
    return expected


def assert_tags_and_values(written, expected, where=""):
    """Exactly the expected tags, each with its own value."""
    assert sorted(written) == sorted(expected), where
    for tag, value in expected.items():
        assert written[tag] == pytest.approx(value, rel=1e-5, abs=1e-9), f"{where} {tag}"


# ----------------------------------------------------------------------------------------------
# 1. Sparse gradients: nn.Embedding(sparse=True) with SGD
# ----------------------------------------------------------------------------------------------


class EmbeddingModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.ModuleDict({"emb": nn.Embedding(10, 4, sparse=True), "head": nn.Linear(4, 1)})

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net["head"](self.net["emb"](x).mean(dim=1))
        loss = nn.functional.mse_loss(out, y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_sparse_embedding_gradients_are_measured_by_their_values(tmp_path):
    torch.manual_seed(0)
    # Indices repeat within a batch: the gradient holds duplicates that coalescing sums.
    x = torch.tensor([[1, 2, 1], [3, 1, 5], [7, 7, 7], [0, 2, 9]] * 2)
    y = torch.randn(8, 1)
    recorder = StepRecorder(prefix="net.")
    trainer = fit(
        tmp_path,
        EmbeddingModule(),
        GradientMonitor(histogram_every_n_steps=2, bins=8),
        DataLoader(TensorDataset(x, y), batch_size=2),
        extra_callbacks=[recorder],
        max_epochs=2,
    )
    acc = read_events(trainer.logger.log_dir)
    values = scalars_by_step(acc)
    hists = histograms(acc)
    assert len(recorder.steps) == 8
    for k, step in enumerate(recorder.steps):
        grad = step["grads"]["emb.weight"]
        assert grad.is_sparse
        dense_norm = torch.linalg.vector_norm(grad.to_dense()).item()
        assert values[k]["grad_norm/emb.weight"] == pytest.approx(dense_norm, rel=1e-6)
        assert values[k]["grad_norm/emb"] == pytest.approx(dense_norm, rel=1e-6)
        expected = expected_scalars(
            step, lambda n: n.rsplit(".", 1)[0], {"emb": "emb", "head": "head"}
        )
        assert_tags_and_values(monitored(values[k]), expected, f"step {k}")
    # Histogram steps 1, 3, 5, 7: the gradient's stored values after coalescing.
    assert sorted(hists["grad_hist/emb.weight"]) == [1, 3, 5, 7]
    for k in (1, 3, 5, 7):
        grad = recorder.steps[k]["grads"]["emb.weight"]
        stored = grad.coalesce().values()
        assert grad._nnz() > grad.coalesce()._nnz()  # duplicates were summed
        h = hists["grad_hist/emb.weight"][k]
        assert h.num == stored.numel() == sum(h.bucket)
        assert h.sum == pytest.approx(stored.sum().item(), rel=1e-5, abs=1e-7)
        assert h.sum_squares == pytest.approx((stored.double() ** 2).sum().item(), rel=1e-5)
        assert (h.min, h.max) == pytest.approx((stored.min().item(), stored.max().item()))
        w = recorder.steps[k]["before"]["emb.weight"]
        assert hists["weight_hist/emb.weight"][k].num == w.numel()


# ----------------------------------------------------------------------------------------------
# 2. Manual optimization: raw optimizers cannot be measured, LightningOptimizers can
# ----------------------------------------------------------------------------------------------


class ManualModule(pl.LightningModule):
    def __init__(self, use_pl_optimizer):
        super().__init__()
        self.automatic_optimization = False
        self.use_pl_optimizer = use_pl_optimizer
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 1)
        self.grad_norms: list[float] = []  # the plain norm of every batch's gradients

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers(use_pl_optimizer=self.use_pl_optimizer)
        opt.zero_grad()
        loss = nn.functional.mse_loss(self.fc2(torch.sigmoid(self.fc1(x))), y)
        self.log("train/loss", loss)
        self.manual_backward(loss)
        self.grad_norms.append(norm([p.grad for p in self.parameters()]))
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_raw_optimizers_in_manual_optimization_warn_once_and_log_nothing(tmp_path, capsys):
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = fit(
            tmp_path,
            ManualModule(use_pl_optimizer=False),
            GradientMonitor(histogram_every_n_steps=1),
            DataLoader(TensorDataset(X_XOR, Y_XOR), batch_size=2),
            max_epochs=3,
        )
    alerts = gradient_alerts(record)
    assert len(alerts) == 1, alerts
    assert "step outside Lightning" in alerts[0]
    assert "use_pl_optimizer=False" in alerts[0]
    assert "self.optimizers()" in alerts[0]  # how to fix it
    acc = read_events(trainer.logger.log_dir)
    assert not [t for t in acc.Tags()["scalars"] if t.startswith(FAMILIES)]
    assert acc.Tags()["histograms"] == []
    assert "train/loss" in acc.Tags()["scalars"]  # Lightning itself logged
    assert "Gradient norms" not in capsys.readouterr().out  # no per-layer table


def test_lightning_optimizers_in_manual_optimization_are_measured(tmp_path, capsys):
    torch.manual_seed(0)
    module = ManualModule(use_pl_optimizer=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = fit(
            tmp_path,
            module,
            GradientMonitor(),
            DataLoader(TensorDataset(X_XOR, Y_XOR), batch_size=2),
            max_epochs=3,
        )
    assert gradient_alerts(record, "outside Lightning") == []
    values = scalars_by_step(read_events(trainer.logger.log_dir))
    assert len(module.grad_norms) == 6
    for k, expected in enumerate(module.grad_norms):
        assert values[k]["grad_norm/total"] == pytest.approx(expected, rel=1e-6)
    assert "Gradient norms" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# 3. Parameters without a gradient: an unused module and a detached branch
# ----------------------------------------------------------------------------------------------


class PartlyUsedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(2, 4)
        self.branch = nn.Linear(2, 4)  # its output is detached: no gradient reaches it
        self.unused = nn.Linear(4, 4)  # never called
        self.fc2 = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)) + self.branch(x).detach())


class NetModule(pl.LightningModule):
    def __init__(self, net, lr=0.1):
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_parameters_without_gradient_get_no_gradient_tags(tmp_path):
    torch.manual_seed(0)
    recorder = StepRecorder(prefix="net.")
    monitor = GradientMonitor(vanishing_patience=2, histogram_every_n_steps=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = fit(
            tmp_path,
            NetModule(PartlyUsedNet()),
            monitor,
            DataLoader(TensorDataset(X_XOR, Y_XOR), batch_size=4),
            extra_callbacks=[recorder],
            max_epochs=20,
        )
    values = scalars_by_step(read_events(trainer.logger.log_dir))
    layers = ("fc1", "branch", "unused", "fc2")
    assert len(recorder.steps) == 20
    for k, step in enumerate(recorder.steps):
        assert step["grads"]["unused.weight"] is None and step["grads"]["branch.bias"] is None
        written = monitored(values[k])
        for layer in ("branch", "unused"):
            assert not [t for t in written if t.startswith(f"grad_norm/{layer}")]
            assert not [t for t in written if t.startswith(f"grad_nonfinite/{layer}")]
        assert written["weight_norm/unused.weight"] == pytest.approx(
            norm([step["before"]["unused.weight"]]), rel=1e-6
        )
        expected = expected_scalars(step, lambda n: n.rsplit(".", 1)[0], {n: n for n in layers})
        assert_tags_and_values(written, expected, f"step {k}")
    # The layers without gradients are not in the norms' history: no vanishing can name them.
    # What names them is the diagnosis that fits: no gradient at all, once, per parameter.
    assert sorted(monitor.history["layers"]) == ["fc1", "fc2"]
    for message in gradient_alerts(record, "vanishing"):
        assert "branch" not in message and "unused" not in message
    (no_gradient,) = [a for a in monitor.summary()["alerts"] if a["kind"] == "no_gradient"]
    assert set(no_gradient["layers"]) == {
        "branch.weight",
        "branch.bias",
        "unused.weight",
        "unused.bias",
    }
    assert {k for a in monitor.summary()["alerts"] for k in [a["kind"]]} == {"no_gradient"}


# ----------------------------------------------------------------------------------------------
# 4. Tags never collide: a module named `total`, a top-level parameter, tied weights
# ----------------------------------------------------------------------------------------------


class CollidingNames(pl.LightningModule):
    """Everything on the LightningModule itself, so no name has a shared prefix to strip."""

    def __init__(self):
        super().__init__()
        self.total = nn.Linear(2, 3)
        self.fc = nn.Linear(3, 3)
        self.dec = nn.Linear(3, 3)
        self.dec.weight = self.fc.weight  # tied: one tensor, named fc.weight
        self.scale = nn.Parameter(torch.tensor(1.5))  # top level: no dot in its name
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        h = torch.tanh(self.fc(torch.tanh(self.total(x))))
        return self.head(torch.tanh(self.dec(h)) * self.scale)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_tags_never_collide(tmp_path):
    torch.manual_seed(0)
    module = CollidingNames()
    names = [n for n, _ in module.named_parameters()]
    assert "fc.weight" in names and "dec.weight" not in names  # tied: named once, first name
    recorder = StepRecorder()
    monitor = GradientMonitor(histogram_every_n_steps=0)
    trainer = fit(
        tmp_path,
        module,
        monitor,
        DataLoader(TensorDataset(X_XOR, Y_XOR), batch_size=4),
        extra_callbacks=[recorder],
        max_epochs=5,
    )
    values = scalars_by_step(read_events(trainer.logger.log_dir))
    # The layer `total` cannot take the whole model's tag; `scale` is its own layer, one tag.
    layer_tags = {
        "total": "total-layer",
        "fc": "fc",
        "dec": "dec",
        "scale": "scale",
        "head": "head",
    }

    def layer_of(name):
        return name.rsplit(".", 1)[0] if "." in name else name

    for k, step in enumerate(recorder.steps):
        grads = step["grads"]
        assert "dec.weight" not in grads
        written = monitored(values[k])
        expected = expected_scalars(step, layer_of, layer_tags)
        # `scale` is a layer and a parameter under one tag: both quantities are its norm.
        assert expected["grad_norm/scale"] == norm([grads["scale"]])
        assert_tags_and_values(written, expected, f"step {k}")
        # The whole model: every distinct parameter once, the tied weight included once.
        total = norm(list(grads.values()))
        assert written["grad_norm/total"] == pytest.approx(total, rel=1e-5)
        twice = math.sqrt(total**2 + norm([grads["fc.weight"]]) ** 2)
        assert written["grad_norm/total"] != pytest.approx(twice, rel=1e-3)
        layer_total = norm([grads["total.weight"], grads["total.bias"]])
        assert written["grad_norm/total-layer"] == pytest.approx(layer_total, rel=1e-5)
        assert layer_total != pytest.approx(total, rel=1e-3)
        # The tied weight is one parameter under its first name; the layer dec holds its bias.
        assert written["grad_norm/fc.weight"] == pytest.approx(norm([grads["fc.weight"]]), rel=1e-5)
        assert written["grad_norm/dec"] == pytest.approx(norm([grads["dec.bias"]]), rel=1e-5)
    # gradients.json and the table keep the layer `total` apart from the total, as the tags do.
    rows = monitor.summary()["layers"]
    assert sorted(rows) == ["dec", "fc", "head", "scale", "total", "total-layer"]
    last = values[len(recorder.steps) - 1]
    assert rows["total"]["last"] == pytest.approx(last["grad_norm/total"], rel=1e-6)
    assert rows["total-layer"]["last"] == pytest.approx(last["grad_norm/total-layer"], rel=1e-6)


# ----------------------------------------------------------------------------------------------
# 5. Two optimizers that step on different steps
# ----------------------------------------------------------------------------------------------


class AlternatingOptimizers(pl.LightningModule):
    """Manual optimization with the LightningOptimizers: on batch k, optimizer 0 steps when
    k % 3 is 0, optimizer 1 when it is 1, both when it is 2."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 1)
        self.batches = 0
        self.plain: list[dict] = []  # per batch: who stepped, and plain norms

    def training_step(self, batch, batch_idx):
        x, y = batch
        opts = self.optimizers()
        for opt in opts:
            opt.zero_grad()
        loss = nn.functional.mse_loss(self.fc2(torch.sigmoid(self.fc1(x))), y)
        self.log("train/loss", loss)
        self.manual_backward(loss)
        k = self.batches
        self.batches += 1
        stepping = {0: [0], 1: [1], 2: [0, 1]}[k % 3]
        params = [list(self.fc1.parameters()), list(self.fc2.parameters())]
        self.plain.append(
            {
                "stepping": stepping,
                "opt": [norm([p.grad for p in ps]) for ps in params],
                "both": norm([p.grad for ps in params for p in ps]),
                "layers": {
                    "fc1": norm([p.grad for p in params[0]]),
                    "fc2": norm([p.grad for p in params[1]]),
                },
                "params": {
                    f"{lay}.{n}": norm([p.grad])
                    for lay in ("fc1", "fc2")
                    for n, p in getattr(self, lay).named_parameters()
                },
            }
        )
        for i in stepping:
            opts[i].step()

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.fc1.parameters(), lr=0.1),
            torch.optim.SGD(self.fc2.parameters(), lr=0.1),
        ]


def test_optimizers_stepping_on_different_steps_get_their_own_totals(tmp_path):
    torch.manual_seed(0)
    module = AlternatingOptimizers()
    x = torch.randn(12, 2)
    y = torch.randn(12, 1)
    trainer = fit(
        tmp_path,
        module,
        GradientMonitor(histogram_every_n_steps=0),
        DataLoader(TensorDataset(x, y), batch_size=2),
        max_epochs=2,
    )
    values = scalars_by_step(read_events(trainer.logger.log_dir))
    assert len(module.plain) == 12
    # One batch is one step (`_batches_that_stepped`), whichever optimizers stepped in it.
    assert sorted(s for s, v in values.items() if "train/loss" in v) == list(range(12))
    for k, plain in enumerate(module.plain):
        written = {t: v for t, v in values[k].items() if t.startswith("grad_norm/")}
        layers = {("fc1", "fc2")[i] for i in plain["stepping"]}
        expected = {f"grad_norm/{lay}": plain["layers"][lay] for lay in layers}
        expected.update(
            {
                f"grad_norm/{lay}.{p}": plain["params"][f"{lay}.{p}"]
                for lay in layers
                for p in ("weight", "bias")
            }
        )
        if len(plain["stepping"]) == 1:
            (i,) = plain["stepping"]
            expected[f"grad_norm/total_optimizer{i}"] = plain["opt"][i]
            assert "grad_norm/total" not in written, f"step {k}"
            assert f"grad_norm/total_optimizer{1 - i}" not in written, f"step {k}"
        else:
            expected["grad_norm/total"] = plain["both"]
            # Per-optimizer totals are optional here; where written, each is its own norm.
            for i in (0, 1):
                if f"grad_norm/total_optimizer{i}" in written:
                    expected[f"grad_norm/total_optimizer{i}"] = plain["opt"][i]
        assert sorted(written) == sorted(expected), f"step {k}"
        for tag, value in expected.items():
            assert written[tag] == pytest.approx(value, rel=1e-5), f"step {k} {tag}"


# ----------------------------------------------------------------------------------------------
# The health rules on a history built by hand: no Trainer, no torch
# ----------------------------------------------------------------------------------------------


def feed(health, observations):
    """{step: [(kind, layers), ...]} of the alerts that start at each step."""
    out = {}
    for obs in observations:
        alerts = health.observe(obs)
        if alerts:
            out[obs.step] = [(a.kind, a.layers) for a in alerts]
    return out


def test_health_nonfinite_fires_once_per_episode_naming_the_layers():
    health = Health(Thresholds())
    norms = {"a": 1.0, "b": 1.0}
    bad = {2: {"a": 2.0, "b": 0.0}, 3: {"a": 1.0, "b": 0.0}, 6: {"a": 0.0, "b": 1.0}}
    observations = [
        Observation(step=s, layer_norms=norms, totals={"total": 1.4}, nonfinite=bad.get(s, {}))
        for s in range(8)
    ]
    # A GradScaler's overflow (Inf gradients with a finite loss) is not the model's problem.
    observations[1] = Observation(
        step=1,
        layer_norms=norms,
        totals={"total": 1.4},
        nonfinite={"a": 3.0},
        loss=0.5,
        overflow_expected=True,
    )
    fired = feed(health, observations)
    assert fired == {2: [("nonfinite", ["a"])], 6: [("nonfinite", ["b"])]}
    assert (
        "at step 2" in health.alerts[0]["message"] and "a (2 values)" in health.alerts[0]["message"]
    )
    assert health.alert_counts == {"a": {"nonfinite": 1}, "b": {"nonfinite": 1}}


def test_health_vanishing_fires_after_patience_and_not_once_converged():
    t = Thresholds(vanishing_patience=3)
    health = Health(t)

    def obs(step, c, loss=1.0):
        return Observation(
            step=step, layer_norms={"a": 1.0, "b": 2.0, "c": c}, totals={"total": 2.2}, loss=loss
        )

    # c drops below vanishing_fraction * median from step 2: the third low step in a row is 4.
    fired = feed(health, [obs(s, 1.5 if s < 2 else 1e-6) for s in range(10)])
    assert fired == {4: [("vanishing", ["c"])]}
    assert "at step 4: c 1.000e-06" in health.alerts[0]["message"]
    # Below vanishing_threshold (1e-7) while the median is above it, though not below the
    # fraction of the median, counts the same.
    health = Health(t)
    small = [
        Observation(step=s, layer_norms={"a": 1e-6, "b": 2e-6, "c": 5e-8}, totals={"total": 2e-6})
        for s in range(6)
    ]
    assert feed(health, small) == {2: [("vanishing", ["c"])]}
    # A loss a millionth of its first value: tiny gradients are the goal, no alert.
    health = Health(t)
    losses = [1.0] + [1e-7] * 9
    fired = feed(health, [obs(s, 1e-6 if s else 1.5, loss=losses[s]) for s in range(10)])
    assert fired == {}
    # One layer alone has no median to vanish against.
    health = Health(t)
    alone = [Observation(step=s, layer_norms={"a": 1e-9}, totals={"total": 1e-9}) for s in range(8)]
    assert feed(health, alone) == {}


def test_health_exploding_fires_over_the_running_median():
    health = Health(Thresholds(exploding_factor=10.0, exploding_window=10))
    totals = [1.0, 1.0, 1.0, 100.0, 1.0, 1.0, 20.0, 25.0, 1.0, 1.0, 30.0]
    observations = [
        Observation(step=s, layer_norms={"a": v}, totals={"total": v}) for s, v in enumerate(totals)
    ]
    fired = feed(health, observations)
    # Step 3: too few earlier values. Step 6: 20 > 10 x median 1 (the mean, 17.5, would not
    # fire); step 7 is the same episode; step 10 starts a new one.
    assert fired == {6: [("exploding", [])], 10: [("exploding", [])]}
    assert "total norm 2.000e+01" in health.alerts[0]["message"]
    assert health.alert_counts == {"total": {"exploding": 2}}
    # Per-optimizer totals each have their own window.
    health = Health(Thresholds(exploding_window=10))
    per_opt = [
        Observation(
            step=s,
            layer_norms={"a": 1.0},
            totals={"total_optimizer0": 1.0, "total_optimizer1": 50.0 if s == 6 else 2.0},
        )
        for s in range(8)
    ]
    assert feed(health, per_opt) == {6: [("exploding", [])]}
    assert "total_optimizer1 norm" in health.alerts[0]["message"]


def test_health_stall_fires_on_a_flat_loss_with_small_updates():
    t = Thresholds(stall_patience=4, stall_update_ratio=1e-3, stall_loss_tol=1e-2)

    def obs(step, ratio, loss):
        return Observation(
            step=step,
            layer_norms={"a": 1.0, "b": 1.0},
            totals={"total": 1.4},
            update_ratios={"a": ratio, "b": ratio / 2},
            loss=loss,
        )

    health = Health(t)
    flat = [obs(s, 1e-5, 0.5 + 1e-4 * (s % 2)) for s in range(8)]
    assert feed(health, flat) == {3: [("stall", [])]}
    assert "stalled at step 3" in health.alerts[0]["message"]
    # A large update ratio resets the count; a loss that moves is no stall either.
    health = Health(t)
    ratios = [1e-5, 1e-5, 1e-5, 1e-2, 1e-5, 1e-5, 1e-5, 1e-5]
    assert feed(health, [obs(s, r, 0.5) for s, r in enumerate(ratios)]) == {7: [("stall", [])]}
    health = Health(t)
    assert feed(health, [obs(s, 1e-5, 0.5 - 0.05 * s) for s in range(8)]) == {}


def test_health_keeps_a_layer_named_total_apart_from_the_total():
    """A layer named ``total`` comes to the rules under its tag, ``total-layer`` (the monitor
    names layers by tag), and keeps its own row and alert counts in the summary, apart from the
    whole model's total and its alerts."""
    health = Health(Thresholds(vanishing_patience=2, exploding_window=10))
    totals = [1.0] * 6 + [50.0, 1.0]
    observations = [
        Observation(
            step=s,
            layer_norms={"a": 1.0, "b": 1.0, "total-layer": 1e-6 if s >= 3 else 1.0},
            totals={"total": v},
        )
        for s, v in enumerate(totals)
    ]
    fired = feed(health, observations)
    assert fired == {4: [("vanishing", ["total-layer"])], 6: [("exploding", [])]}
    rows = health.summary()["layers"]
    assert sorted(rows) == ["a", "b", "total", "total-layer"]
    assert rows["total-layer"]["last"] == 1e-6 and rows["total-layer"]["max"] == 1.0
    assert rows["total"]["max"] == 50.0 and rows["total"]["last"] == 1.0
    assert rows["total-layer"]["alerts"] == {"vanishing": 1}
    assert rows["total"]["alerts"] == {"exploding": 1}
