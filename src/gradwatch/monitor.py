r"""
Gradient Monitor
================

Logs per-layer gradient norms, weight norms, update ratios and histograms, and raises health alerts
(non-finite, vanishing, exploding, stalled), on the same steps as Lightning's own logging and at the
cost of one device-to-host transfer per logging step.

"""

import json
import math
import os
import statistics
from collections import deque
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from gradwatch.overhead import skip_unused_step_hooks, use_fast_crc32c

_NONFINITE_POLICIES = ("warn", "stop")
_STATS = ("min", "max", "count", "sum", "sumsq")
# Taken on device for histograms; the count and the sum of squares follow from the numel and the
# norm when the norm is finite, as it is unless a value is NaN or Inf.
_FAST_STATS = ("min", "max", "sum")
# On CPU, `torch.histc` is three times slower than the same bins computed with its own formula and
# `torch.bincount`; below this size one histc call costs less than the four ops of the formula.
_BINCOUNT_MIN_NUMEL = 4096
# Up to this many parameter values in all, on the CPU, scalar steps are computed in Python: reading
# them costs ~0.1 us a value, a torch op ~5 us in a run (measured crossover ~500 values, hot).
_HOST_MAX_NUMEL = 256
# Strategies that shard parameters: each rank's gradients are a slice of the model's, and norms of a
# slice are not the model's norms. Checked by name so optional back-ends need not be importable.
_SHARDED_STRATEGIES = (
    "FSDPStrategy",
    "DeepSpeedStrategy",
    "ModelParallelStrategy",
    "XLAFSDPStrategy",
)


# A loss this fraction of its first logged value means training has converged: no vanishing alert.
CONVERGED_LOSS_FRACTION = 1e-6


class GradientAlert(UserWarning):
    """The category of the monitor's console alerts: filter them, or turn them into errors."""


class GradientMonitor(Callback):
    r"""Logs per-layer gradient statistics and warns when gradients go wrong.

    On the steps where Lightning writes ``self.log`` values
    (``(step + 1) % log_every_n_steps == 0``, at the same step number), the monitor reads every
    parameter of every optimizer after accumulation, all-reduce and AMP unscaling and before
    clipping (``on_before_optimizer_step``), and writes through every logger in ``trainer.loggers``:

    - ``grad_norm/total``, ``grad_norm/<layer>``, ``grad_norm/<layer>.<param>``: L2 norms; the total
      is the norm of the layer norms. Other ``norm_types`` go to ``grad_norm_<p>/...``
      (``grad_norm_inf/...``, ``grad_norm_1/...``)
    - ``grad_norm/total_clipped``: the total after clipping, when ``Trainer(gradient_clip_val=...)``
    - ``grad_nonfinite/<layer>``, ``grad_nonfinite/total``: counts of NaN and Inf gradient values
    - ``weight_norm/<layer>.<param>`` and ``update_ratio/<layer>``: the norm of the step's change of
      a layer's parameters over their norm before the step (healthy training sits near 1e-3)

    Every ``histogram_every_n_steps`` it also writes ``grad_hist/<layer>.<param>`` and
    ``weight_hist/<layer>.<param>`` (``torch.histc`` over the finite range, into ``bins`` bins) to
    the TensorBoard logger. Alerts go to the console once per episode (as :class:`GradientAlert`
    warnings) and to TensorBoard as text under ``alerts``. At the end of training, rank zero writes
    ``gradients.json`` and ``grad_flow.png`` to ``trainer.default_root_dir`` and prints a per-layer
    table.

    Layer names are parameter names with the leading module path that every parameter shares removed
    (``net.fc1.weight`` and torch.compile's ``net._orig_mod.fc1.weight`` become ``fc1.weight``, of
    layer ``fc1``).

    Cost: on other steps the monitor does nothing (with ``on_nonfinite="stop"``, one on-device
    finiteness check per step, never read back until the next logging step). On a logging step all
    scalars are packed into one tensor and moved to the host once; a histogram step adds a second
    transfer for the histogram counts. A model of at most 256 parameter values on the CPU (the
    tutorial's has 9) is read as Python floats on scalar steps instead, its norms taken in double
    precision: cheaper there than a dozen torch ops.

    Args:
        log_every_n_steps: write scalars every this many optimizer steps. ``None``: the Trainer's
            ``log_every_n_steps``, so the values line up with ``train/loss``. ``0``: never.
        histogram_every_n_steps: write histograms every this many optimizer steps. ``None``: ten
            times the scalar cadence. ``0``: no histograms.
        bins: number of histogram bins (TensorBoard shows about 64 whatever is written).
        norm_types: norms to log; ``2`` is always logged (``grad_norm/``), others such as ``1`` or
            ``inf`` (``"inf"`` works too) in their own family ``grad_norm_<p>/``.
        log_weight_norms: write ``weight_norm/<layer>.<param>``.
        log_update_ratio: write ``update_ratio/<layer>`` (costs a copy of the weights on logging
            steps). The stall alert needs it.
        vanishing_threshold: a layer whose gradient norm is below this while the median layer's is
            above it is vanishing.
        vanishing_fraction: a layer whose gradient norm is below this fraction of the median layer
            norm is vanishing.
        vanishing_patience: logging steps in a row a layer must be vanishing before the alert.
        exploding_factor: the total norm above this many times its running median is exploding.
        exploding_window: logging steps in the running median.
        stall_update_ratio: the stall alert needs every layer's update ratio below this.
        stall_loss_tol: ... and the loss's range over the window below this fraction of its mean.
        stall_patience: logging steps in a row both must hold before the stall alert.
        on_nonfinite: ``"warn"``: alert and continue. ``"stop"``: alert and set
            ``trainer.should_stop``; training ends after the logging step that first sees a
            non-finite gradient (checked on device every step, read back on logging steps).
        plot: draw ``grad_flow.png`` at the end of training (matplotlib, a few tenths of a second).
            ``False`` leaves it to the caller: :meth:`save_plot` draws it any time, e.g. after
            ``trainer.fit`` returns, which is what gradwatch's own training script does.

    Raises:
        ValueError:
            If an argument is out of its range (the message names it and the allowed values).
        MisconfigurationException:
            In ``setup``, with a strategy that shards parameters (FSDP, DeepSpeed, model parallel):
            per-shard norms are not the model's norms.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from gradwatch.monitor import GradientMonitor
        >>> monitor = GradientMonitor(norm_types=(2, "inf"), histogram_every_n_steps=500)
        >>> trainer = Trainer(callbacks=[monitor], log_every_n_steps=50)

    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        bins: int = 64,
        norm_types: Sequence[float | int | str] = (2,),
        log_weight_norms: bool = True,
        log_update_ratio: bool = True,
        vanishing_threshold: float = 1e-7,
        vanishing_fraction: float = 1e-3,
        vanishing_patience: int = 5,
        exploding_factor: float = 10.0,
        exploding_window: int = 50,
        stall_update_ratio: float = 3e-4,
        stall_loss_tol: float = 1e-2,
        stall_patience: int = 10,
        on_nonfinite: str = "warn",
        plot: bool = True,
    ) -> None:
        _check_int("log_every_n_steps", log_every_n_steps, minimum=0, allow_none=True)
        _check_int("histogram_every_n_steps", histogram_every_n_steps, minimum=0, allow_none=True)
        _check_int("bins", bins, minimum=1)
        _check_int("vanishing_patience", vanishing_patience, minimum=1)
        _check_int("exploding_window", exploding_window, minimum=1)
        _check_int("stall_patience", stall_patience, minimum=2)
        for name, value in (
            ("vanishing_threshold", vanishing_threshold),
            ("vanishing_fraction", vanishing_fraction),
            ("stall_update_ratio", stall_update_ratio),
            ("stall_loss_tol", stall_loss_tol),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"GradientMonitor: {name} must be a number >= 0, got {value!r}")
        if (
            isinstance(exploding_factor, bool)
            or not isinstance(exploding_factor, int | float)
            or not exploding_factor > 1
        ):
            raise ValueError(
                f"GradientMonitor: exploding_factor must be a number > 1, got {exploding_factor!r}"
            )
        if on_nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(
                f"GradientMonitor: on_nonfinite must be one of {list(_NONFINITE_POLICIES)},"
                f" got {on_nonfinite!r}"
            )
        if isinstance(norm_types, str | bytes) or not isinstance(norm_types, Sequence):
            raise ValueError(
                "GradientMonitor: norm_types must be a list of numbers > 0 or 'inf',"
                f" got {norm_types!r}"
            )
        self.norm_types = [2.0] + [p for p in map(_parse_norm_type, norm_types) if p != 2.0]
        self.norm_types = list(dict.fromkeys(self.norm_types))

        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.bins = bins
        self.log_weight_norms = log_weight_norms
        self.log_update_ratio = log_update_ratio
        self.vanishing_threshold = float(vanishing_threshold)
        self.vanishing_fraction = float(vanishing_fraction)
        self.vanishing_patience = vanishing_patience
        self.exploding_factor = float(exploding_factor)
        self.exploding_window = exploding_window
        self.stall_update_ratio = float(stall_update_ratio)
        self.stall_loss_tol = float(stall_loss_tol)
        self.stall_patience = stall_patience
        self.on_nonfinite = on_nonfinite
        self.plot = plot

        # Resolved in `on_train_start`, once the loggers, optimizers and precision are known.
        self._enabled = True
        self._scalar_every = 0
        self._hist_every = 0
        self._tb: TensorBoardLogger | None = None
        self._names: dict[int, str] = {}
        self._pending: list[dict[str, Any]] = []
        self._plans: dict[tuple[int, bool], _Plan] = {}
        self._step: int = -1
        self._write_scalars = False
        self._write_hist = False
        # Stop mode: the first step with a non-finite gradient, kept on device (no sync).
        self._first_bad_step: Tensor | None = None
        self._reset_state()
        # Lightning's dispatch passes over the per-step hooks this class does not use, and over
        # `on_train_batch_end` on the steps that collect nothing (49 in 50): it is None on the
        # instance but on the steps that do (`on_before_optimizer_step` shows it).
        skip_unused_step_hooks(self)
        self._hide_finish_hook()

    def _reset_state(self) -> None:
        # Everything here is plain Python (host values from the packed transfer): it is the
        # checkpointed state, loadable with torch's safe `weights_only=True`.
        self._history: dict[str, Any] = {"step": [], "total": [], "layers": {}, "update_ratio": {}}
        self._totals: deque[float] = deque(maxlen=self.exploding_window)
        self._vanishing_run: dict[str, int] = {}
        self._stall_losses: deque[float] = deque(maxlen=self.stall_patience)
        self._first_loss: float | None = None
        self._episodes: dict[str, bool] = {}
        self._alert_counts: dict[str, dict[str, int]] = {}
        self._alerts: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------
    # Lightning hooks
    # ------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        strategy = type(trainer.strategy)
        if any(cls.__name__ in _SHARDED_STRATEGIES for cls in strategy.__mro__):
            raise MisconfigurationException(
                f"GradientMonitor does not support {strategy.__name__}: each rank holds a shard of"
                " the parameters, and norms of a shard are not the model's norms. Use a DDP"
                " strategy (`ddp`, `ddp_spawn`) or remove the monitor from the callbacks."
            )

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._enabled = bool(trainer.loggers)
        if not self._enabled:
            rank_zero_warn(
                "GradientMonitor: the Trainer has no logger, so there is nowhere to write gradient"
                " statistics; the monitor is off for this run.",
                category=GradientAlert,
            )
            return
        self._scalar_every = (
            trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        )
        if self.histogram_every_n_steps is None:
            self._hist_every = 10 * self._scalar_every
        else:
            self._hist_every = self.histogram_every_n_steps
        self._tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if self._tb is not None:
            use_fast_crc32c()  # histograms are kilobytes: checksum them in C (gradwatch.overhead)
        if self._hist_every and self._tb is None:
            others = ", ".join(type(lg).__name__ for lg in trainer.loggers)
            rank_zero_warn(
                "GradientMonitor: histograms need a TensorBoardLogger and the loggers are"
                f" {others};"
                " scalars go to every logger, histograms are off for this run.",
                category=GradientAlert,
            )
            self._hist_every = 0
        self._names = _parameter_names(pl_module)
        self._plans = {}

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Optimizer
    ) -> None:
        if not self._enabled:
            return
        # Lightning's own logging writes when `(_batches_that_stepped + 1) % log_every_n_steps == 0`
        # (or when stopping), at step `_batches_that_stepped`, which counts batches that stepped
        # (not optimizer steps: several optimizers in one batch share a step). No public attribute
        # has this meaning, so read the one Lightning's logger connector reads.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        write_scalars = self._scalar_every > 0 and (
            (step + 1) % self._scalar_every == 0 or trainer.should_stop
        )
        write_hist = self._hist_every > 0 and (step + 1) % self._hist_every == 0
        if not (write_scalars or write_hist):
            if self.on_nonfinite == "stop":
                self._track_nonfinite(_optimizer_params(optimizer), step)
            return  # the common case: nothing at all
        self._step, self._write_scalars, self._write_hist = step, write_scalars, write_hist
        self._pending.append(
            self._collect(trainer, optimizer, _optimizer_params(optimizer), write_hist)
        )
        self.__dict__.pop("on_train_batch_end", None)  # the class's hook, for this step

    @override
    def on_train_batch_end(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._hide_finish_hook()
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self._finish(trainer, pending, loss if isinstance(loss, Tensor) else None)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._pending = []
        self._hide_finish_hook()
        if not self._enabled or not trainer.is_global_zero:
            return
        summary = self.summary()
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        with open(os.path.join(trainer.default_root_dir, "gradients.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if self.plot:
            self.save_plot(os.path.join(trainer.default_root_dir, "grad_flow.png"))
        print(self._table(summary))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self._history,
            "totals": list(self._totals),
            "vanishing_run": dict(self._vanishing_run),
            "stall_losses": list(self._stall_losses),
            "first_loss": self._first_loss,
            "episodes": dict(self._episodes),
            "alert_counts": {k: dict(v) for k, v in self._alert_counts.items()},
            "alerts": list(self._alerts),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._reset_state()
        self._history = state_dict["history"]
        self._totals.extend(state_dict["totals"])
        self._vanishing_run = dict(state_dict["vanishing_run"])
        self._stall_losses.extend(state_dict["stall_losses"])
        self._first_loss = state_dict.get("first_loss")
        self._episodes = dict(state_dict["episodes"])
        self._alert_counts = {k: dict(v) for k, v in state_dict["alert_counts"].items()}
        self._alerts = list(state_dict["alerts"])

    # ------------------------------------------------------------------------------------------
    # On device: collect before the step, finish after it
    # ------------------------------------------------------------------------------------------

    def _hide_finish_hook(self) -> None:
        # A subclass that overrides the hook keeps it on every step.
        if type(self).on_train_batch_end is GradientMonitor.on_train_batch_end:
            self.on_train_batch_end = None  # type: ignore[method-assign,assignment]

    def _name(self, param: Tensor, index: int) -> str:
        return self._names.get(id(param), f"param{index}")

    def _track_nonfinite(self, params: list[Tensor], step: int) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        norms = [n for _, group in _by_device_dtype(grads) for n in _norms(group, 2.0)]
        device = grads[0].device
        bad = torch.stack([n.to(device) for n in norms]).isfinite().logical_not().any()
        if self._first_bad_step is None or self._first_bad_step.device != device:
            self._first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        first = self._first_bad_step
        self._first_bad_step = torch.where(bad & (first < 0), step, first)

    def _plan(
        self, trainer: "pl.Trainer", optimizer: Optimizer, params: list[Tensor], hist: bool
    ) -> "_Plan":
        """The optimizer's plan, reused while its parameters, which of them have gradients and the
        kind of step stay the same (on every logging step of a usual run)."""
        key = (id(optimizer), hist)
        plan = self._plans.get(key)
        if plan is None or not plan.fits(params):
            plan = _Plan(self, trainer, optimizer, params, hist)
            self._plans[key] = plan
        return plan

    def _collect(
        self, trainer: "pl.Trainer", optimizer: Optimizer, params: list[Tensor], hist: bool
    ) -> dict[str, Any]:
        """Takes every statistic of ``params`` that must be taken before clipping and the
        optimizer step: on the gradients' device, with nothing moved to the host, or for small
        CPU models on the host (see `_Plan.on_host`)."""
        plan = self._plan(trainer, optimizer, params, hist)
        pending = self._collect_on_host(plan) if plan.on_host else self._collect_on_device(plan)
        # The plan's keys are shared by its steps: extended here as a copy.
        keys, parts = pending["keys"], pending["parts"]
        if self.on_nonfinite == "stop" and self._first_bad_step is not None:
            keys = [*keys, ("first_bad_step", "")]
            parts.append(self._first_bad_step.reshape(1).to(plan.exact))
            self._first_bad_step = None
        if plan.unscale:
            # Optimizers that unscale inside `step()` (fused ones) leave the hook scaled
            # gradients: Lightning does not unscale them, so divide by the scaler's scale (on the
            # host). A copy: `scaler.update()` changes the scale in place before the transfer
            # (halved on an overflow).
            keys = [*keys, ("scale", "")]
            parts.append(plan.scaler._get_scale_async().detach().clone().reshape(1))
        pending["keys"] = keys
        return pending

    def _collect_on_host(self, plan: "_Plan") -> dict[str, Any]:
        """`_collect_on_device` for a few hundred values on the CPU: read as Python floats and
        reduced in double precision. A dozen torch ops cost more than the arithmetic here (in a
        run, where each op comes in cold after 49 steps of Lightning: 0.1 ms against 0.03 ms for
        the tutorial's network)."""
        values: dict[tuple[str, str], float] = {}
        grads = [p.grad for p in plan.grad_params]
        for name, grad in zip(plan.grad_names, grads, strict=True):
            xs = _host_values(grad)
            for ord_ in self.norm_types:
                values[(f"norm{ord_}", name)] = _host_norm(xs, ord_)
            if plan.clipping:
                values[("nonfinite", name)] = float(sum(not math.isfinite(x) for x in xs))
        before: list[list[float]] = []
        if plan.weight_norms:
            for name, weight in zip(plan.weight_names, plan.weights, strict=True):
                ws = _host_values(weight)
                values[("weight_norm", name)] = _host_norm(ws, 2.0)
                before.append(ws)
        pending = {"plan": plan, "keys": [], "parts": [], "grads": grads, "values": values}
        if plan.snapshot:
            pending["host_snapshots"] = before
        return pending

    def _collect_on_device(self, plan: "_Plan") -> dict[str, Any]:
        """The statistics as tensors on the gradients' device, to be moved to the host at once
        after the step (`_finish`)."""
        parts: list[Tensor] = []
        grads: list[Tensor] = []
        grad_copies: list[Tensor] = []
        for group in plan.grad_groups:
            group_grads = [p.grad for p in group]
            grads += group_grads
            for ord_ in self.norm_types:
                parts.append(torch.stack(_norms(group_grads, ord_)))
            if plan.clipping:
                # Clipping rescales NaN/Inf gradients in place after this hook (a NaN total
                # turns every value NaN): count them now, while they are the model's.
                counts = torch.stack([_count_nonfinite(g) for g in group_grads])
                parts.append(counts.to(plan.exact))
            if plan.hist:
                parts += _fast_stats(group_grads)
                # Clipping (and the module's own hook) may change the gradients in place after
                # this hook; the histograms must show the same gradients as the norms.
                grad_copies += torch._foreach_mul(group_grads, 1)
        snapshots: list[list[Tensor]] = []
        for group in plan.weight_groups:
            weights = [p.detach() for p in group]
            if plan.weight_norms:
                parts.append(torch.stack(_norms(weights, 2.0)))
            if plan.hist:
                parts += _fast_stats(weights)
            if plan.snapshot:
                # A copy of the weights before the step: one foreach op per device and dtype.
                snapshots.append(list(torch._foreach_mul(weights, 1)))
        pending: dict[str, Any] = {"plan": plan, "keys": plan.keys, "parts": parts, "grads": grads}
        if snapshots:
            pending["snapshots"] = snapshots
        if plan.hist:
            pending["grad_copies"] = grad_copies
        return pending

    def _finish(self, trainer: "pl.Trainer", pending: list[dict[str, Any]], loss: Any) -> None:
        """After the optimizer step: the update norms, then the one transfer of the step."""
        keys: list[tuple[str, str]] = []
        parts: list[Tensor] = []
        values: dict[tuple[str, str], float] = {}
        for item in pending:
            keys += item["keys"]
            parts += item["parts"]
            if "values" in item:  # taken on the host
                values.update(item["values"])
                if "host_snapshots" in item:  # taken for update ratios only (no histograms)
                    plan = item["plan"]
                    for name, weight, before in zip(
                        plan.weight_names, plan.weights, item["host_snapshots"], strict=True
                    ):
                        after = _host_values(weight)
                        delta = [a - b for a, b in zip(after, before, strict=True)]
                        values[("update", name)] = _host_norm(delta, 2.0)
            elif "snapshots" in item and self.log_update_ratio:
                groups = item["plan"].weight_groups
                for group, snapshot in zip(groups, item["snapshots"], strict=True):
                    deltas = torch._foreach_sub([p.detach() for p in group], snapshot)
                    parts.append(torch.stack(_norms(deltas, 2.0)))
                keys += item["plan"].update_keys
        clip = trainer.gradient_clip_val
        if clip:
            # Lightning clips after this callback's hook; the gradients still hold the clipped
            # values until the next step's zero_grad, so measure them rather than model clipping.
            grads = [g for item in pending for g in item["grads"]]
            if grads:
                keys.append(("clipped_total", ""))
                parts.append(
                    torch.linalg.vector_norm(torch.stack(_all_norms(grads, 2.0))).reshape(1)
                )
        if loss is not None:
            keys.append(("loss", ""))
            parts.append(loss.detach().reshape(1))
        if parts:
            device = parts[0].device
            if any(p.device != device for p in parts):
                parts = [p.to(device) for p in parts]
            # The one device-to-host transfer of the step. Every part is 1-D; cat promotes
            # float32 norms to float64 where a part is float64 (statistics, counts), and a
            # float32's Python float is exact either way.
            flat = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()
            values.update(zip(keys, flat, strict=True))
        if not values:
            return
        self._count_nonfinite_where_needed(pending, values)
        scale = values.get(("scale", ""), 1.0)
        all_names = [n for item in pending for n in item["plan"].all_names]
        scaler = any(item["plan"].scaler is not None for item in pending)
        metrics = self._analyse(trainer, values, all_names, scale, scaler)
        if not trainer.is_global_zero:
            # Other ranks hold the same all-reduced gradients: they keep the same alert state (so
            # `should_stop` agrees on every rank without a collective) but write nothing.
            return
        if self._write_scalars:
            for logger in trainer.loggers:
                _log_scalars(logger, metrics, self._step)
        if self._write_hist and self._tb is not None:
            self._write_histograms(self._histograms(pending, values), self._step)

    @staticmethod
    def _count_nonfinite_where_needed(
        pending: list[dict[str, Any]], values: dict[tuple[str, str], float]
    ) -> None:
        """NaN/Inf counts of the gradients whose norm is not finite (a second transfer, on such
        steps only); every other gradient has none."""
        uncounted = [
            (n, g)
            for item in pending
            if not item["plan"].clipping
            for n, g in zip(item["plan"].grad_names, item["grads"], strict=True)
        ]
        bad = {n: g for n, g in uncounted if not math.isfinite(values[("norm2.0", n)])}
        for n, _ in uncounted:
            values[("nonfinite", n)] = 0.0
        if bad:
            counts = [_count_nonfinite(g).item() for g in bad.values()]
            values.update(zip([("nonfinite", n) for n in bad], counts, strict=True))

    @staticmethod
    def _complete_stats(
        jobs: list[tuple[str, str, Tensor]], values: dict[tuple[str, str], float]
    ) -> None:
        """A histogram's count and sum of squares: the numel and the squared norm when the norm
        is finite; otherwise every statistic again over the finite values alone (a transfer
        more, on such steps only)."""
        for kind, name, tensor in jobs:
            norm = values[("norm2.0" if kind == "grad" else "weight_norm", name)]
            if math.isfinite(norm):
                values[(f"{kind}_count", name)] = float(tensor.numel())
                values[(f"{kind}_sumsq", name)] = norm * norm
            else:
                row = torch.cat(_finite_stats([tensor])).tolist()
                values.update(zip([(f"{kind}_{stat}", name) for stat in _STATS], row, strict=True))

    def _histograms(
        self, pending: list[dict[str, Any]], values: dict[tuple[str, str], float]
    ) -> list[tuple[str, float, float, float, float, float, list[float], list[float]]]:
        """The second transfer: ``torch.histc`` counts over each tensor's finite range. Consumes
        the step's copies of the gradients and weights (binning overwrites them)."""
        jobs: list[tuple[str, str, Tensor]] = []
        for item in pending:
            if "grad_copies" not in item:
                continue
            plan = item["plan"]
            for n, g in zip(plan.grad_names, item["grad_copies"], strict=True):
                jobs.append(("grad", n, g))
            snapshots = [w for group in item["snapshots"] for w in group]
            for n, w in zip(plan.weight_names, snapshots, strict=True):
                jobs.append(("weight", n, w))
        self._complete_stats(jobs, values)
        scale = values.get(("scale", ""), 1.0)
        counts: list[Tensor] = []
        meta = []
        deterministic = torch.are_deterministic_algorithms_enabled()
        for kind, name, tensor in jobs:
            lo, hi = values[(f"{kind}_min", name)], values[(f"{kind}_max", name)]
            num = values[(f"{kind}_count", name)]
            if num == 0:
                continue  # every value non-finite: nothing to draw, counted in grad_nonfinite
            meta.append((kind, name, lo, hi, num))
            if lo == hi:
                counts.append(torch.full((1,), num, dtype=torch.float64, device=tensor.device))
                continue
            x = tensor
            if deterministic and x.device.type == "cuda":
                x = x.cpu()  # `torch.histc` has no deterministic CUDA kernel
            x = _flat_float(x)
            counts.append(_histc_(x, self.bins, lo, hi, finite=num == x.numel()).double())
        if not counts:
            return []
        device = counts[0].device
        host = torch.cat([c.to(device) for c in counts]).tolist()  # the second transfer
        out = []
        offset = 0
        for kind, name, lo, hi, num in meta:
            n_bins = 1 if lo == hi else self.bins
            bucket = host[offset : offset + n_bins]
            offset += n_bins
            div = scale if kind == "grad" else 1.0
            lo_s, hi_s = lo / div, hi / div
            if n_bins == 1:
                limits = [hi_s]
            else:
                width = (hi_s - lo_s) / n_bins
                limits = [lo_s + width * (i + 1) for i in range(n_bins)]
                limits[-1] = hi_s
            # TensorBoard buckets are right limits; an empty bucket at the left holds the minimum.
            out.append(
                (
                    f"{kind}_hist/{name}",
                    lo_s,
                    hi_s,
                    num,
                    values[(f"{kind}_sum", name)] / div,
                    values[(f"{kind}_sumsq", name)] / div**2,
                    [lo_s, *limits],
                    [0.0, *bucket],
                )
            )
        return out

    def _write_histograms(self, hists: list[tuple], step: int) -> None:
        assert self._tb is not None
        values = [
            Summary.Value(
                tag=tag,
                histo=HistogramProto(
                    min=lo,
                    max=hi,
                    num=num,
                    sum=total,
                    sum_squares=sumsq,
                    bucket_limit=limits,
                    bucket=counts,
                ),
            )
            for tag, lo, hi, num, total, sumsq, limits, counts in hists
        ]
        _write_summary(self._tb, Summary(value=values), step)

    # ------------------------------------------------------------------------------------------
    # On the host: metrics, alerts, history
    # ------------------------------------------------------------------------------------------

    def _analyse(
        self,
        trainer: "pl.Trainer",
        values: dict[tuple[str, str], float],
        all_names: list[str],
        scale: float,
        scaler: bool,
    ) -> dict[str, float]:
        metrics: dict[str, float] = {}
        layers: dict[str, list[str]] = {}
        for n in all_names:
            layers.setdefault(_layer(n), []).append(n)
        layer_norm: dict[str, float] = {}
        total = 0.0
        for ord_ in self.norm_types:
            family = "grad_norm" if ord_ == 2.0 else f"grad_norm_{_format_ord(ord_)}"
            per_param = {n: values.get((f"norm{ord_}", n), 0.0) / scale for n in all_names}
            for n, v in per_param.items():
                metrics[f"{family}/{n}"] = v
            per_layer = {
                lay: _combine([per_param[n] for n in ps], ord_) for lay, ps in layers.items()
            }
            for lay, v in per_layer.items():
                metrics[f"{family}/{lay}"] = v
            metrics[f"{family}/total"] = _combine(list(per_layer.values()), ord_)
            if ord_ == 2.0:
                layer_norm, total = per_layer, metrics[f"{family}/total"]
        if ("clipped_total", "") in values:
            metrics["grad_norm/total_clipped"] = values[("clipped_total", "")] / scale
        nonfinite = {
            lay: sum(values.get(("nonfinite", n), 0.0) for n in ps) for lay, ps in layers.items()
        }
        for lay, v in nonfinite.items():
            metrics[f"grad_nonfinite/{lay}"] = v
        metrics["grad_nonfinite/total"] = sum(nonfinite.values())
        if self.log_weight_norms:
            for n in all_names:
                if ("weight_norm", n) in values:
                    metrics[f"weight_norm/{n}"] = values[("weight_norm", n)]
        ratios: dict[str, float] = {}
        if self.log_update_ratio:
            for lay, ps in layers.items():
                if not all(("update", n) in values for n in ps):
                    continue
                delta = math.sqrt(sum(values[("update", n)] ** 2 for n in ps))
                weight = math.sqrt(sum(values[("weight_norm", n)] ** 2 for n in ps))
                if weight > 0:
                    ratios[lay] = delta / weight
                    metrics[f"update_ratio/{lay}"] = ratios[lay]
        if self._write_scalars:
            self._record(layer_norm, total, ratios)
            loss = values.get(("loss", ""))
            self._check_alerts(trainer, layer_norm, total, nonfinite, ratios, loss, scaler, values)
        return metrics

    def _record(self, layer_norm: dict[str, float], total: float, ratios: dict[str, float]) -> None:
        history = self._history
        history["step"].append(self._step)
        history["total"].append(total)
        n_before = len(history["step"]) - 1
        for lay, v in layer_norm.items():
            # A layer first seen late (a second optimizer, unfrozen weights) is padded with NaN.
            history["layers"].setdefault(lay, [math.nan] * n_before).append(v)
        history["update_ratio"].update(ratios)

    def _check_alerts(
        self,
        trainer: "pl.Trainer",
        layer_norm: dict[str, float],
        total: float,
        nonfinite: dict[str, float],
        ratios: dict[str, float],
        loss: float | None,
        scaler: bool,
        values: dict[tuple[str, str], float],
    ) -> None:
        step = self._step
        # Non-finite. Under a GradScaler, inf gradients with a finite loss are the scaler's overflow
        # signal (it skips the step and lowers the scale), not a problem of the model.
        bad = {lay: int(c) for lay, c in nonfinite.items() if c > 0}
        first_bad = values.get(("first_bad_step", ""), -1.0)
        if bad and scaler and loss is not None and math.isfinite(loss):
            bad = {}
        real_nonfinite = bool(bad) or first_bad >= 0
        if self._episode("nonfinite", real_nonfinite):
            where = ", ".join(f"{lay} ({c} values)" for lay, c in bad.items()) or "none now"
            since = f", first seen at step {int(first_bad)}" if first_bad >= 0 else ""
            action = (
                "; stopping training (on_nonfinite='stop')" if self.on_nonfinite == "stop" else ""
            )
            self._alert(
                trainer,
                "nonfinite",
                list(bad),
                f"non-finite gradients at step {step}{since} in layers: {where}{action}",
            )
        if real_nonfinite and self.on_nonfinite == "stop":
            trainer.should_stop = True

        # Converged: the loss a millionth of its first logged value. Gradients that small are the
        # goal reached (Adam on XOR ends at a loss of 1e-13 or exactly 0), not vanishing layers.
        if self._first_loss is None and loss is not None and math.isfinite(loss):
            self._first_loss = loss
        converged = (
            loss is not None
            and self._first_loss is not None
            and abs(loss) <= CONVERGED_LOSS_FRACTION * abs(self._first_loss)
        )

        # Vanishing: only relative to the rest of the network. When every layer is tiny together
        # (converged, or a too-small learning rate) that is the stall alert's story, not this one's.
        finite = [v for v in layer_norm.values() if math.isfinite(v)]
        median = statistics.median(finite) if finite else 0.0
        vanishing = []
        for lay, v in layer_norm.items():
            low = not converged and (
                v < self.vanishing_fraction * median or v < self.vanishing_threshold <= median
            )
            run = self._vanishing_run.get(lay, 0) + 1 if low and len(finite) > 1 else 0
            self._vanishing_run[lay] = run
            if self._episode(f"vanishing:{lay}", run >= self.vanishing_patience):
                vanishing.append(lay)
        if vanishing:
            details = ", ".join(f"{lay} {layer_norm[lay]:.3e}" for lay in vanishing)
            self._alert(
                trainer,
                "vanishing",
                vanishing,
                f"vanishing gradients at step {step}: {details} against a median layer norm of"
                f" {median:.3e}, for {self.vanishing_patience} logged steps in a row",
            )

        # Exploding: against the running median of earlier totals.
        history = [t for t in self._totals if math.isfinite(t)]
        exploding = (
            math.isfinite(total)
            and len(history) >= min(5, self.exploding_window)
            and total > self.exploding_factor * statistics.median(history) > 0
        )
        if self._episode("exploding", exploding):
            self._alert(
                trainer,
                "exploding",
                [],
                f"exploding gradients at step {step}: total norm {total:.3e} is more than"
                f" {self.exploding_factor:g}x its running median {statistics.median(history):.3e}",
            )
        self._totals.append(total)

        # Stall: a flat, non-zero loss while every layer barely moves.
        small = bool(ratios) and max(ratios.values()) < self.stall_update_ratio
        if small and loss is not None and math.isfinite(loss):
            self._stall_losses.append(loss)
        else:
            self._stall_losses.clear()
        losses = list(self._stall_losses)
        mean = sum(losses) / len(losses) if losses else 0.0
        stalled = (
            len(losses) >= self.stall_patience
            and abs(mean) > 1e-12
            and (max(losses) - min(losses)) <= self.stall_loss_tol * abs(mean)
        )
        if self._episode("stall", stalled):
            worst = max(ratios, key=ratios.get)
            self._alert(
                trainer,
                "stall",
                [],
                f"training has stalled at step {step}: the loss has stayed at {mean:.4g} for"
                f" {len(losses)} logged steps while every layer's update ratio is below"
                f" {self.stall_update_ratio:g} (largest {ratios[worst]:.2e}, {worst}): the learning"
                " rate looks too small",
            )

    def _episode(self, key: str, active: bool) -> bool:
        """True when an episode of ``key`` starts: alerts print once per episode, not every step."""
        was = self._episodes.get(key, False)
        self._episodes[key] = active
        return active and not was

    def _alert(self, trainer: "pl.Trainer", kind: str, layers: list[str], message: str) -> None:
        for lay in layers or ["total"]:
            counts = self._alert_counts.setdefault(lay, {})
            counts[kind] = counts.get(kind, 0) + 1
        self._alerts.append(
            {"step": self._step, "kind": kind, "layers": layers, "message": message}
        )
        if not trainer.is_global_zero:
            return
        rank_zero_warn(f"GradientMonitor: {message}", category=GradientAlert)
        if self._tb is not None:
            self._tb.experiment.add_text("alerts", f"**{kind}**: {message}", global_step=self._step)

    # ------------------------------------------------------------------------------------------
    # After training
    # ------------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The per-layer summary written to ``gradients.json``: first, last, min and max of each
        layer's gradient norm, its last update ratio and its alert counts."""
        history = self._history
        layers = {}
        series = dict(history["layers"])
        series["total"] = history["total"]
        for lay, values in series.items():
            finite = [v for v in values if math.isfinite(v)]
            layers[lay] = {
                "first": _json_float(values[0]) if values else None,
                "last": _json_float(values[-1]) if values else None,
                "min": min(finite) if finite else None,
                "max": max(finite) if finite else None,
                "last_update_ratio": _json_float(history["update_ratio"].get(lay)),
                "alerts": dict(self._alert_counts.get(lay, {})),
            }
        return {
            "steps": list(history["step"]),
            "layers": layers,
            "alerts": [dict(a) for a in self._alerts],
        }

    def _table(self, summary: dict[str, Any]) -> str:
        head = (
            f"{'layer':<24}{'first':>12}{'last':>12}{'min':>12}{'max':>12}{'upd ratio':>12}  alerts"
        )
        lines = ["Gradient norms (L2) per layer:", head]

        def fmt(v: Any) -> str:
            return f"{v:12.3e}" if isinstance(v, float) else f"{'-' if v is None else v!s:>12}"

        for lay, row in summary["layers"].items():
            alerts = ", ".join(f"{k} x{c}" for k, c in row["alerts"].items()) or "-"
            lines.append(
                f"{lay:<24}{fmt(row['first'])}{fmt(row['last'])}{fmt(row['min'])}"
                f"{fmt(row['max'])}{fmt(row['last_update_ratio'])}  {alerts}"
            )
        return "\n".join(lines)

    def save_plot(self, path: str | os.PathLike) -> None:
        """Draw the per-layer gradient norms logged so far to `path` (a PNG), log scale."""
        if not self._history["step"]:
            return
        # The object-oriented API with the Agg canvas: no pyplot state, no display needed.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        steps = self._history["step"]
        for lay, values in self._history["layers"].items():
            ax.plot(steps, [v if v > 0 else math.nan for v in values], label=lay)
        ax.plot(
            steps, [v if v > 0 else math.nan for v in self._history["total"]], "k--", label="total"
        )
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("gradient L2 norm")
        ax.set_title("Gradient flow: per-layer gradient norms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)


class _Plan:
    """What a logging step computes for one optimizer's parameters, worked out once: names,
    groups of one device and dtype (one foreach kernel each), the keys of the packed values in
    the order they are computed, and the optimizer's relation to a GradScaler."""

    def __init__(
        self,
        monitor: GradientMonitor,
        trainer: "pl.Trainer",
        optimizer: Optimizer,
        params: list[Tensor],
        hist: bool,
    ) -> None:
        self.params = list(params)
        self.has_grad = [p.grad is not None for p in params]
        names = {id(p): monitor._name(p, i) for i, p in enumerate(params)}
        self.all_names = [names[id(p)] for p in params]
        self.clipping = bool(trainer.gradient_clip_val)
        # Counts and step numbers travel as floats: float64 holds them exactly (MPS has none).
        self.exact = torch.float32 if params and params[0].device.type == "mps" else torch.float64
        self.weight_norms = monitor.log_weight_norms or monitor.log_update_ratio or hist
        self.snapshot = monitor.log_update_ratio or hist
        self.scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.unscale = self.scaler is not None and getattr(
            optimizer, "_step_supports_amp_scaling", False
        )
        with_grad = [p for p in params if p.grad is not None]
        self.grad_groups = [group for _, group in _by_device_dtype(with_grad)]
        self.weight_groups = [group for _, group in _by_device_dtype(self.params)]
        self.grad_params = [p for group in self.grad_groups for p in group]
        self.weights = [p for group in self.weight_groups for p in group]
        self.grad_names = [names[id(p)] for p in self.grad_params]
        self.weight_names = [names[id(p)] for p in self.weights]
        self.hist = hist
        # A network as small as the tutorial's, on the CPU: its statistics are cheaper in Python
        # than in torch ops. Histogram steps stay on torch's `histc`.
        self.on_host = (
            not hist
            and not self.unscale
            and all(p.device.type == "cpu" and p.is_floating_point() for p in params)
            and sum(p.numel() for p in params) <= _HOST_MAX_NUMEL
        )
        keys: list[tuple[str, str]] = []
        for group in self.grad_groups:
            group_names = [names[id(p)] for p in group]
            for ord_ in monitor.norm_types:
                keys += [(f"norm{ord_}", n) for n in group_names]
            if self.clipping:
                keys += [("nonfinite", n) for n in group_names]
            if hist:
                keys += [(f"grad_{stat}", n) for stat in _FAST_STATS for n in group_names]
        for group in self.weight_groups:
            group_names = [names[id(p)] for p in group]
            if self.weight_norms:
                keys += [("weight_norm", n) for n in group_names]
            if hist:
                keys += [(f"weight_{stat}", n) for stat in _FAST_STATS for n in group_names]
        self.keys = keys
        self.update_keys = [("update", n) for n in self.weight_names]

    def fits(self, params: list[Tensor]) -> bool:
        """Still right for these parameters: the same tensors, the same ones with gradients."""
        return (
            len(params) == len(self.params)
            and all(p is q for p, q in zip(params, self.params, strict=True))
            and all((p.grad is not None) is h for p, h in zip(params, self.has_grad, strict=True))
        )


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _log_scalars(logger: Logger, metrics: dict[str, float], step: int) -> None:
    """TensorBoard gets all of a step's scalars as one event (one record, one checksum, computed
    in Python by TensorBoard's writer): the logger's log_metrics writes an event per scalar,
    which costs more than computing the norms. Other loggers get their log_metrics."""
    if isinstance(logger, TensorBoardLogger):
        summary = Summary()
        add = summary.value.add  # half the time of building Summary.Value objects first
        for tag, value in metrics.items():
            add(tag=tag, simple_value=value)
        _write_summary(logger, summary, step)
    else:
        logger.log_metrics(metrics, step=step)


def _write_summary(logger: TensorBoardLogger, summary: Summary, step: int) -> None:
    logger.experiment._get_file_writer().add_summary(summary, step)


def _histc_(x: Tensor, bins: int, lo: float, hi: float, finite: bool) -> Tensor:
    """``torch.histc(x, bins, lo, hi)``, overwriting ``x`` (a copy the caller owns). On CPU, for
    large tensors of finite values, the same counts from histc's own formula (``(x - lo) / (hi -
    lo) * bins``, truncated, the maximum in the last bin) and ``torch.bincount``, in place so that
    no large temporary is allocated: a third of histc's time. (NaN has no bin: histc skips it.)"""
    if not finite or x.device.type != "cpu" or x.numel() < _BINCOUNT_MIN_NUMEL:
        return torch.histc(x, bins=bins, min=lo, max=hi)
    index = x.sub_(lo).div_(hi - lo).mul_(bins).to(torch.int32).clamp_(max=bins - 1)
    return torch.bincount(index, minlength=bins)


def _count_nonfinite(tensor: Tensor) -> Tensor:
    return tensor.isfinite().logical_not().sum()


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"GradientMonitor: {name} must be {allowed}, got {value!r}")


def _parse_norm_type(value: Any) -> float:
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity"):
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(
            f"GradientMonitor: norm_types must hold numbers > 0 or 'inf', got {value!r}"
        )
    return float(value)


def _format_ord(ord_: float) -> str:
    return "inf" if math.isinf(ord_) else f"{ord_:g}"


def _combine(norms: list[float], ord_: float) -> float:
    """The p-norm of a concatenation from the p-norms of its parts (for L2: the norm of norms)."""
    if not norms:
        return 0.0
    if math.isinf(ord_):
        return max(norms)
    if any(math.isnan(v) for v in norms):
        return math.nan
    return math.fsum(v**ord_ for v in norms) ** (1.0 / ord_)


def _layer(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _json_float(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return str(value)  # JSON has no NaN or Infinity


def _parameter_names(pl_module: "pl.LightningModule") -> dict[int, str]:
    """Parameter names without the leading module path that every parameter shares (``net.``,
    torch.compile's ``_orig_mod.``), as long as every name keeps a ``layer.param`` form."""
    named = list(pl_module.named_parameters())
    parts = [n.split(".") for n, _ in named]
    strip = 0
    while parts and all(len(p) - strip > 2 for p in parts):
        if len({p[strip] for p in parts}) != 1:
            break
        strip += 1
    return {id(p): ".".join(s[strip:]) for (_, p), s in zip(named, parts, strict=True)}


def _optimizer_params(optimizer: Optimizer) -> list[Tensor]:
    seen: set[int] = set()
    params = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                params.append(p)
    return params


def _by_device_dtype(tensors: list[Tensor]) -> list[tuple[tuple[Any, Any], list[Tensor]]]:
    groups: dict[tuple[Any, Any], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.items())


def _norms(tensors: list[Tensor], ord_: float) -> list[Tensor]:
    """Norms of same-device, same-dtype tensors in one foreach kernel; half precision sums in fp32
    (a sum of squares overflows fp16 at 256)."""
    low = tensors[0].dtype in (torch.float16, torch.bfloat16)
    return list(torch._foreach_norm(tensors, ord_, dtype=torch.float32 if low else None))


def _all_norms(tensors: list[Tensor], ord_: float) -> list[Tensor]:
    device = tensors[0].device
    return [n.to(device) for _, group in _by_device_dtype(tensors) for n in _norms(group, ord_)]


def _host_values(tensor: Tensor) -> list[float]:
    """The tensor's values as a flat list of Python floats (exact: a double holds any float32)."""
    values = tensor.tolist()  # nested lists; flattened in Python (a reshape is a torch op)
    if tensor.dim() == 0:
        return [values]
    for _ in range(tensor.dim() - 1):
        values = [x for row in values for x in row]
    return values


def _host_norm(values: list[float], ord_: float) -> float:
    """`torch.linalg.vector_norm` of Python floats, in double precision: NaN if any value is NaN,
    as torch gives, and without overflow for large powers (scaled by the largest value)."""
    if any(math.isnan(x) for x in values):
        return math.nan
    if ord_ == 2.0:
        return math.hypot(*values)
    largest = max(map(abs, values), default=0.0)
    if math.isinf(ord_) or largest in (0.0, math.inf):
        return largest
    return largest * math.fsum((abs(x) / largest) ** ord_ for x in values) ** (1.0 / ord_)


def _flat_float(tensor: Tensor) -> Tensor:
    """The values as one flat float32 or float64 tensor (half precision counts and sums in fp32)."""
    x = tensor.detach().reshape(-1)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _fast_stats(tensors: list[Tensor]) -> list[Tensor]:
    """Per tensor: min, max and sum (two passes); NaN or Inf make them non-finite, and then
    `_finite_stats` takes over on the host."""
    mins, maxs, sums = [], [], []
    for t in tensors:
        x = _flat_float(t)
        lo, hi = torch.aminmax(x) if x.numel() else (x.new_zeros(()), x.new_zeros(()))
        mins.append(lo)
        maxs.append(hi)
        sums.append(x.sum())
    return [torch.stack(s).double() for s in (mins, maxs, sums)]


def _finite_stats(tensors: list[Tensor]) -> list[Tensor]:
    """Per tensor, over its finite values: min, max, count, sum and sum of squares."""
    mins, maxs, counts, sums, sumsqs = [], [], [], [], []
    for t in tensors:
        x = _flat_float(t)
        finite = x.isfinite()
        zeroed = torch.where(finite, x, 0.0)
        mins.append(torch.where(finite, x, math.inf).amin() if x.numel() else x.new_zeros(()))
        maxs.append(torch.where(finite, x, -math.inf).amax() if x.numel() else x.new_zeros(()))
        counts.append(finite.sum().to(x.dtype))
        sums.append(zeroed.sum())
        sumsqs.append(zeroed.square().sum())
    return [torch.stack(s).double() for s in (mins, maxs, counts, sums, sumsqs)]
