"""GradientMonitor, the Lightning callback: arguments, hooks and cadence. Every computation is
delegated: statistics on the device (``stats``), histograms (``histograms``), tags and scalars
(``names``, ``scalars``), alert rules (``health``) and writing (``writers``)."""

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from gradwatch.monitor import arguments, first_screen, histograms, sharded, spikes, stats, writers
from gradwatch.monitor.activations import STATS, ActivationProbe
from gradwatch.monitor.alerts import Alert, GradientAlert
from gradwatch.monitor.arguments import check_bool, check_choice, check_int, check_number
from gradwatch.monitor.every_step import (
    StepBuffer,
    StepRecord,
    StepValues,
    checked_events,
)
from gradwatch.monitor.fresh import FreshGradients
from gradwatch.monitor.health import Health, Observation, Thresholds, format_table
from gradwatch.monitor.names import Tags, optimizer_params, parameter_names, stored_values
from gradwatch.monitor.scalars import step_scalars
from gradwatch.monitor.stats import Measurement
from gradwatch.monitor.writers import ScalarStep

# Strategies that shard parameters in ways the monitor cannot combine (flat parameters, ZeRO
# partitions): each rank's gradients are a slice of the model's, and norms of a slice are not the
# model's norms. Lightning's ModelParallelStrategy (FSDP2's DTensors) is measured whole
# (`sharded`). Checked by name so optional back-ends need not be importable.
SHARDED_STRATEGIES = (
    "FSDPStrategy",
    "DeepSpeedStrategy",
    "XLAFSDPStrategy",
)
# More bins than TensorBoard can show, and a bound on the memory of a histogram step.
MAX_BINS = 10_000


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
    - ``grad_nonfinite/<layer>``, ``grad_nonfinite/total``: counts of NaN and Inf gradient values,
      written only at the steps and for the layers where a count is not zero (a healthy run has
      none of these tags)
    - ``weight_norm/<layer>.<param>`` and ``update_ratio/<layer>``: the norm of the step's change of
      a layer's parameters over their norm before the step (healthy training sits near 1e-3)

    A parameter without a gradient at a step gets no gradient tags at that step. Where several
    optimizers step on different steps, each gets its own total (``grad_norm/total_optimizer1``).
    Sparse gradients (``nn.Embedding(sparse=True)``) are measured by their stored values.

    Every ``histogram_every_n_steps`` it also writes ``grad_hist/<layer>.<param>`` and
    ``weight_hist/<layer>.<param>`` (``torch.histc`` over the finite range, into ``bins`` bins) to
    the TensorBoard logger, for tensors of at least ``histogram_min_values`` values: a histogram of
    a handful of values is a handful of spikes, and such a tensor's norms are already in
    ``grad_norm/<layer>.<param>`` and ``weight_norm/<layer>.<param>``. Alerts go to the console
    once per episode (as :class:`GradientAlert` warnings) and to TensorBoard as text under
    ``alerts``. At the end of training, rank zero writes ``gradients.json`` to
    ``trainer.default_root_dir`` and prints a per-layer table;
    :func:`gradwatch.report.save_grad_flow` draws :attr:`history`.

    Cost: on other steps the monitor does nothing (with ``on_nonfinite="stop"``, one on-device
    finiteness check per step, never read back until the next logging step). On a logging step all
    scalars are moved to the host in one transfer; a histogram step adds a second transfer for the
    histogram counts. Under data parallelism a logging step also all-reduces the loss, so that
    every rank's alerts use the loss that is logged (the mean over the processes).

    Under FSDP2 (Lightning's ``ModelParallelStrategy`` with ``fully_shard``: every parameter a
    DTensor sharded over the ranks) every value is the whole model's, combined from each rank's
    shards by :mod:`gradwatch.monitor.sharded`: one all-reduce per logging step (a second for
    inf norms, the stop mode's first bad step and histogram ranges, a third for histogram
    counts), and every rank keeps the same alert state.

    Args:
        log_every_n_steps: write scalars every this many optimizer steps. ``None``: the Trainer's
            ``log_every_n_steps``, so the values line up with ``train/loss``. ``0``: never.
        histogram_every_n_steps: write histograms every this many optimizer steps. ``None``: ten
            times the scalar cadence. ``0``: no histograms.
        bins: number of histogram bins (TensorBoard shows about 64 whatever is written), at most
            10000.
        histogram_min_values: tensors with fewer values get no histogram (their norm scalars
            carry them); ``1``: a histogram of every tensor. The default, 16: fewer values fill
            at most a quarter of the 64 default bins, spikes rather than a shape.
        norm_types: norms to log; ``2`` is always logged (``grad_norm/``), others such as ``1`` or
            ``inf`` (``"inf"`` works too) in their own family ``grad_norm_<p>/``.
        log_weight_norms: write ``weight_norm/<layer>.<param>``.
        log_update_ratio: write ``update_ratio/<layer>`` (costs a copy of the weights on logging
            steps). The stall alert needs it.
        vanishing_threshold, vanishing_fraction, vanishing_patience, exploding_factor,
        exploding_window, stall_update_ratio, stall_loss_tol, stall_patience, dead_fraction,
        saturated_fraction, symmetric_fraction, activation_patience: when the alerts fire
            (:class:`gradwatch.monitor.rules.Thresholds`; the rules are in ``rules.py``).
        log_activations: write ``activation/dead|saturated|alike/<layer>`` from forward pre-hooks
            attached for the forward of logging steps only (off under ``torch.compile``, where
            hooks would recompile the module). The dead, saturated and symmetric units alerts
            need them.
        activation_histograms: write ``activation_hist/<layer>`` on histogram steps.
        saturation_eps: how close to a sigmoid's or tanh's bound a saturated output is.
        every_step: also write every step's gradient norms (the ``grad_norm`` families, their
            totals, ``grad_norm/total_clipped`` and the log10 copies), taken on the device at
            every step and moved to the host with the next logging step's one transfer
            (:mod:`gradwatch.monitor.every_step`); the rest stays at ``log_every_n_steps``. It
            also checks every step for spikes.
        on_spike: with ``every_step``, what a spike of the total gradient norm or of the loss
            does (:mod:`gradwatch.monitor.spikes`): ``"warn"``: an alert of kind ``spike`` and
            ``spike/<quantity>`` (its robust z-score) at its step; ``"skip"``: also, a spike of
            the gradient norm is not stepped on (every gradient of the optimizer set to None
            before its step, as if the batch had none; counted in ``spike/skipped_steps``): one
            host read of one flag per step; ``"off"``.
        spike_window, spike_sigma, spike_factor: a spike lies more than ``spike_sigma`` robust
            standard deviations above the median of the ``spike_window`` steps before it, in
            log space, and is at least ``spike_factor`` times that median.
        on_nonfinite: ``"warn"``: alert and continue. ``"stop"``: alert and set
            ``trainer.should_stop``; training ends after the logging step that first sees a
            non-finite gradient (checked on device every step, read back on logging steps).

    Raises:
        ValueError:
            If an argument is out of its range (the message names it and the allowed values).
        MisconfigurationException:
            In ``setup``, with a strategy that shards parameters other than as DTensors (FSDP1,
            DeepSpeed, XLA's FSDP): per-shard norms are not the model's norms.
        ValueError:
            In ``on_train_start``, with DTensor parameters laid out other than sharded over
            every rank (tensor parallelism, replicated parameters).

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
        histogram_min_values: int = 16,
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
        log_activations: bool = True,
        activation_histograms: bool = False,
        saturation_eps: float = 1e-3,
        dead_fraction: float = 0.75,
        saturated_fraction: float = 0.5,
        symmetric_fraction: float = 0.5,
        activation_patience: int = 3,
        every_step: bool = False,
        on_spike: str = "warn",
        spike_window: int = 128,
        spike_sigma: float = 6.0,
        spike_factor: float = 5.0,
    ) -> None:
        check_int("log_every_n_steps", log_every_n_steps, minimum=0, allow_none=True)
        check_int("histogram_every_n_steps", histogram_every_n_steps, minimum=0, allow_none=True)
        check_int("bins", bins, minimum=1, maximum=MAX_BINS)
        check_int("histogram_min_values", histogram_min_values, minimum=1)
        check_bool("log_weight_norms", log_weight_norms)
        check_bool("log_update_ratio", log_update_ratio)
        check_bool("log_activations", log_activations)
        check_bool("activation_histograms", activation_histograms)
        check_number(
            "saturation_eps", saturation_eps, "a number in (0, 0.5)", lambda v: 0 < v < 0.5
        )
        check_bool("every_step", every_step)
        check_choice("on_spike", on_spike, ("warn", "skip", "off"))
        check_int("spike_window", spike_window, minimum=4)
        check_number("spike_sigma", spike_sigma, "a number > 0", lambda v: v > 0)
        check_number("spike_factor", spike_factor, "a number > 1", lambda v: v > 1)
        if on_spike == "skip" and not every_step:
            raise ValueError(
                "GradientMonitor: on_spike='skip' needs every_step=true (spikes are found from"
                " every step's gradient norm), got every_step=false"
            )
        self.norm_types = arguments.norm_types(norm_types)
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.bins = bins
        self.histogram_min_values = histogram_min_values
        self.log_weight_norms = log_weight_norms
        self.log_update_ratio = log_update_ratio
        self.on_nonfinite = on_nonfinite
        self.log_activations = log_activations
        self.activation_histograms = activation_histograms
        self._probe = ActivationProbe(eps=saturation_eps, keep_values=activation_histograms)
        self.every_step = every_step
        self.on_spike = on_spike
        self._buffer = StepBuffer(self.norm_types)
        rule = spikes.SpikeRule(window=spike_window, sigma=spike_sigma, factor=spike_factor)
        self._spikes = spikes.SpikeWatch(rule, skip=on_spike == "skip")
        self._recorded_step: int | None = None  # the step of the batch's records, until its end
        # every_step, per optimizer: (its param groups' count, parameters, index, itself: held
        # so that its id, the key, is not reused by another).
        self._stepping: dict[int, tuple[int, list[Tensor], int, Optimizer]] = {}
        self._scaler: Any = None  # the precision plugin's GradScaler, if any
        # The alert rules check their own thresholds.
        self.health = Health(
            Thresholds(
                vanishing_threshold=vanishing_threshold,
                vanishing_fraction=vanishing_fraction,
                vanishing_patience=vanishing_patience,
                exploding_factor=exploding_factor,
                exploding_window=exploding_window,
                stall_update_ratio=stall_update_ratio,
                stall_loss_tol=stall_loss_tol,
                stall_patience=stall_patience,
                on_nonfinite=on_nonfinite,
                dead_fraction=dead_fraction,
                saturated_fraction=saturated_fraction,
                symmetric_fraction=symmetric_fraction,
                activation_patience=activation_patience,
            )
        )
        # Resolved in `on_train_start`, once the loggers, optimizers and module are known.
        self._enabled = True
        self._scalar_every = 0
        self._hist_every = 0
        self._tb: TensorBoardLogger | None = None
        self._names: dict[int, str] = {}
        self._tags = Tags([])
        self._pending: list[Measurement] = []
        self._step = -1
        self._write_scalars = self._write_hist = False
        self._measured_once = self._warned_unmeasured = False
        # FSDP2: every rank measures its shards, and each logging step combines them.
        self._sharded = False
        # Stop mode: the first step with a non-finite gradient, kept on device (no sync).
        self._first_bad_step: Tensor | None = None
        # Parameters that require grad but are in no optimizer's param groups, by name.
        self._unoptimized: list[tuple[str, Tensor]] = []
        # The logging step's parameters without a gradient, and those with one no optimizer steps.
        self._no_gradient: list[str] = []
        self._not_optimized: list[str] = []
        self._read_first_loss = False
        self._hooks_allowed = True
        self._fresh = FreshGradients()
        self._low_precision: dict[str, str] = {}  # 16-bit layers' dtypes, from on_train_start
        self._follow_backward = self._every_step_work = False  # set in on_train_start
        # This batch's plan, from on_train_batch_start: whether it writes, whether it logs
        # scalars at the cadence. True until the first batch says otherwise.
        self._batch_writes = self._batch_logs = True
        self._first_steps = True  # the first loss and the check that Lightning steps are pending
        # Per optimizer of the step: (carried, fresh) norms, None where nothing was carried.
        self._carried: list[Tensor | None] = []

    @property
    def history(self) -> dict[str, Any]:
        """Steps and per-layer and total L2 norms of every scalar step so far, and the last update
        ratio of each layer: what :func:`gradwatch.report.save_grad_flow` draws."""
        return self.health.history

    def summary(self) -> dict[str, Any]:
        """The per-layer summary written to ``gradients.json``: first, last, min and max of each
        layer's gradient norm, its last update ratio and its alert counts, and every alert."""
        return self.health.summary()

    # ------------------------------------------------------------------------------------------
    # Lightning hooks
    # ------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        strategy = type(trainer.strategy)
        if any(cls.__name__ in SHARDED_STRATEGIES for cls in strategy.__mro__):
            raise MisconfigurationException(
                f"GradientMonitor does not support {strategy.__name__}: each rank holds a shard of"
                " the parameters, and norms of a shard are not the model's norms. Use a DDP"
                " strategy (`ddp`, `ddp_spawn`), FSDP2 through ModelParallelStrategy, or remove"
                " the monitor from the callbacks."
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
        every = self.log_every_n_steps
        self._scalar_every = trainer.log_every_n_steps if every is None else every
        every = self.histogram_every_n_steps
        self._hist_every = 10 * self._scalar_every if every is None else every
        self._tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if self._hist_every and self._tb is None:
            others = ", ".join(type(lg).__name__ for lg in trainer.loggers)
            rank_zero_warn(
                "GradientMonitor: histograms need a TensorBoardLogger and the loggers are"
                f" {others}; scalars go to every logger, histograms are off for this run.",
                category=GradientAlert,
            )
            self._hist_every = 0
        if self._tb is not None and trainer.is_global_zero:
            first_screen.write_layout(self._tb)
        self._names = parameter_names(pl_module)
        self._sharded = sharded.check_layout(pl_module, trainer.world_size)
        if self._sharded and self.every_step and self.on_spike == "skip":
            raise ValueError(
                "GradientMonitor: on_spike='skip' is not supported under FSDP2: deciding before"
                " each step needs the whole model's gradient norm, a collective at every step."
                " Use on_spike='warn' (spikes found at their step, reported at the next logging"
                " step) or 'off'."
            )
        self._buffer = StepBuffer(self.norm_types)
        self._stepping = {}
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._tags = Tags(list(self._names.values()), num_optimizers=len(trainer.optimizers))
        # The precision plugin has converted the module by now (bf16-true: bfloat16 weights).
        self._low_precision = {
            self._tags.layer_of_param(self._names[id(p)]): str(p.dtype).removeprefix("torch.")
            for p in pl_module.parameters()
            if p.dtype in (torch.bfloat16, torch.float16) and id(p) in self._names
        }
        # Hooks added and removed around a compiled module's forward would recompile it at every
        # logging step: under torch.compile the hook-based statistics are off.
        self._hooks_allowed = not any(
            type(m).__name__ == "OptimizedModule" for m in pl_module.modules()
        )
        # The carried-gradient check, where .grad is the backward's own (see FreshGradients).
        self._follow_backward = (
            self._hooks_allowed and trainer.world_size == 1 and self._scaler is None
        )
        # Work at every step, not only on those that write.
        self._every_step_work = (
            self.every_step and self._scalar_every > 0
        ) or self.on_nonfinite == "stop"
        stepped = {id(p) for opt in trainer.optimizers for p in optimizer_params(opt)}
        self._unoptimized = [
            (self._tags.param(self._names[id(p)]), p)
            for p in pl_module.parameters()
            if p.requires_grad and id(p) not in stepped and id(p) in self._names
        ]

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if not self._enabled:
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        write_scalars, write_hist = self._writes_at(trainer, step)
        # Read by this batch's other hooks, which have nothing to do on most steps.
        self._batch_writes = write_scalars or write_hist
        self._batch_logs = bool(self._scalar_every) and (step + 1) % self._scalar_every == 0
        # Activation hooks only for the forward of a step that logs: other steps run without one.
        if self._batch_logs and self._hooks_allowed and self.log_activations:
            self._probe.detach()
            self._probe.attach(pl_module, self._names)

    @override
    def on_before_backward(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Tensor
    ) -> None:
        if not (self._enabled and self._batch_logs):
            return
        # The forward is over: the activation statistics are taken now, while the backward still
        # needs the layers' inputs, rather than keeping those inputs alive after it.
        self._probe.detach()
        # The carried-gradient check follows a logging step's backward from here, after
        # Lightning's closure (and a manual step's own code) has run zero_grad: a parameter whose
        # .grad is None now carries nothing and needs no hook (see FreshGradients).
        if self._follow_backward:
            self._fresh.attach([p for opt in trainer.optimizers for p in optimizer_params(opt)])

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Optimizer
    ) -> None:
        if not self._enabled:
            return
        self._measured_once = True
        if not (self._batch_writes or self._every_step_work or trainer.should_stop):
            return  # the common case without every_step: nothing at all
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        write_scalars, write_hist = self._writes_at(trainer, step)
        record = self.every_step and self._scalar_every > 0
        if not (write_scalars or write_hist):
            if record:  # every_step's common case: the norms alone
                recorded, params = self._record(trainer, optimizer, step)
                if self.on_nonfinite == "stop":
                    self._track_nonfinite(params, step)
                self._skip_if_spike(recorded, params)
            elif self.on_nonfinite == "stop":
                self._track_nonfinite(optimizer_params(optimizer), step)
            return
        recorded = self._record(trainer, optimizer, step)[0] if record else None
        params = optimizer_params(optimizer)
        scale = self._scale_of(optimizer)
        index = _index_of(optimizer, trainer.optimizers)
        names = self._param_names(params)
        self._probe.detach()  # the forward is over
        self._step, self._write_scalars, self._write_hist = step, write_scalars, write_hist
        if not self._pending:
            self._no_gradient = []
            self._not_optimized = [name for name, p in self._unoptimized if p.grad is not None]
        self._no_gradient += [
            self._tags.param(n) for n, p in zip(names, params, strict=True) if p.grad is None
        ]
        self._pending.append(
            stats.measure(
                optimizer_index=index,
                params=params,
                names=names,
                norm_types=self.norm_types,
                # Clipping rescales NaN/Inf gradients in place after this hook: count them now.
                # Shards are counted now too, so that the counts join the step's one all-reduce.
                count_nonfinite_now=bool(trainer.gradient_clip_val) or self._sharded,
                weight_norms=self.log_weight_norms or self.log_update_ratio or write_hist,
                snapshot=self.log_update_ratio or write_hist,
                copy_grads=write_hist,
                scale=scale,
            )
        )
        if self._fresh.attached:
            # None: nothing carried (every parameter began the step without a .grad).
            self._carried.append(self._fresh.carried_and_fresh(params))
        self._skip_if_spike(recorded, params)

    def _writes_at(self, trainer: "pl.Trainer", step: int) -> tuple[bool, bool]:
        """Whether ``step`` writes scalars, and whether it writes histograms."""
        # Lightning's own logging writes when `(_batches_that_stepped + 1) % log_every_n_steps ==
        # 0` (or when stopping), at step `_batches_that_stepped`, which counts batches that
        # stepped (not optimizer steps: several optimizers in one batch share a step). No public
        # attribute has this meaning, so read the one Lightning's logger connector reads.
        every = self._scalar_every
        write_scalars = every > 0 and ((step + 1) % every == 0 or trainer.should_stop)
        write_hist = self._hist_every > 0 and (step + 1) % self._hist_every == 0
        return write_scalars, write_hist

    def _record(
        self, trainer: "pl.Trainer", optimizer: Optimizer, step: int
    ) -> tuple[StepRecord | None, list[Tensor]]:
        """every_step: this step's gradient norms into the buffer (``None`` when no parameter
        has a gradient), and the optimizer's parameters."""
        # The optimizer's parameters and index, worked out once per optimizer (again when it
        # gains a param group): every_step asks at every step. Frozen parameters stay in the
        # list; the buffer passes over them.
        known = self._stepping.get(id(optimizer))
        if known is None or known[0] != len(optimizer.param_groups):
            unique = {id(p): p for g in optimizer.param_groups for p in g["params"]}
            index = _index_of(optimizer, trainer.optimizers)
            known = (len(optimizer.param_groups), list(unique.values()), index, optimizer)
            self._stepping[id(optimizer)] = known
        _, params, index, _ = known
        scale = self._scale_of(optimizer)
        recorded = self._buffer.record(
            step, index, params, lambda: self._param_names(params), scale
        )
        if recorded is not None:
            self._recorded_step = step
        return recorded, params

    def _scale_of(self, optimizer: Optimizer) -> Tensor | None:
        """The GradScaler's scale when ``optimizer`` unscales inside ``step()`` (fused ones):
        Lightning leaves this hook scaled gradients, and the values are divided by it."""
        scaler = self._scaler
        if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
            return None
        return scaler._get_scale_async()

    def _param_names(self, params: list[Tensor]) -> list[str]:
        return [self._names.get(id(p), f"param{i}") for i, p in enumerate(params)]

    def _skip_if_spike(self, recorded: StepRecord | None, params: list[Tensor]) -> None:
        """``on_spike="skip"``: when the step's total gradient norm is a spike, the optimizer
        does not step: torch's optimizers pass over parameters without a gradient (no update,
        no momentum or Adam moment, no weight decay)."""
        if recorded is None or not self._spikes.skip:
            return
        n = len(recorded.grad_names)
        total = torch.linalg.vector_norm(recorded.norms[:n].double())  # L2 comes first
        if recorded.scale is not None:
            total = total / recorded.scale.double()
        if self._spikes.should_skip(recorded.step, recorded.optimizer_index, total):
            for p in params:
                p.grad = None

    @override
    def on_train_batch_end(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # Most steps: nothing hooked, measured or recorded, and the first steps' checks done.
        if not (
            self._batch_logs
            or self._pending
            or self._recorded_step is not None
            or self._first_steps
        ):
            return
        self._probe.detach()
        self._fresh.detach()
        if self._recorded_step is not None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self._buffer.after_step(
                self._recorded_step,
                loss if isinstance(loss, Tensor) else None,
                clipped=bool(trainer.gradient_clip_val),
            )
            self._recorded_step = None
        if self._pending:
            self._fresh.clear()  # measured: the next logging step follows its own
        if not self._read_first_loss:
            self._read_first_loss = True
            if self.health.observed.first_loss is None:  # a resumed run has its own
                self._take_first_loss(trainer, outputs)
        if not self._pending:
            if not (self._measured_once or self._warned_unmeasured):
                self._warn_if_stepped_outside_lightning(trainer, pl_module)
            self._first_steps = not (self._measured_once or self._warned_unmeasured)
            return
        pending, self._pending = self._pending, []
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self._finish(trainer, pending, loss if isinstance(loss, Tensor) else None)

    def _take_first_loss(self, trainer: "pl.Trainer", outputs: Any) -> None:
        # The rules measure progress from the loss at the start; the first logged one may come
        # after the damage (a run that diverges in a few steps). Read once (a host sync, at the
        # first step only), in a single process: each rank's own loss would give the ranks
        # different alerts.
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor) and trainer.world_size == 1 and loss.numel() == 1:
            value = float(loss.detach())
            self.health.observed.first_loss = value if math.isfinite(value) else None

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._pending = []
        self._flush_steps(trainer)  # the steps after the last logging step
        if not self._enabled or not trainer.is_global_zero:
            return
        summary = self.summary()
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        with open(os.path.join(trainer.default_root_dir, "gradients.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if summary["steps"]:
            print(format_table(summary))

    @override
    def on_save_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        # The steps before a checkpoint are written with it, so that a run resumed from it has
        # them all (a run stopped between two logging steps included). Under FSDP2 they wait:
        # writing them would take a collective inside the checkpoint's save.
        if not self._sharded:
            self._flush_steps(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.health.state_dict(), "spikes": self._spikes.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.health.load_state_dict(state_dict)
        if "spikes" in state_dict:
            self._spikes.load_state_dict(state_dict["spikes"])

    # ------------------------------------------------------------------------------------------
    # A logging step: measured before the optimizer step, finished after it
    # ------------------------------------------------------------------------------------------

    def _finish(
        self, trainer: "pl.Trainer", pending: list[Measurement], loss: Tensor | None
    ) -> None:
        """After the optimizer step: the update norms, the one transfer, then scalars, alerts and
        histograms."""
        parts = [part for m in pending for part in stats.device_parts(m)]
        # Lightning clips after the measuring hook; the gradients hold the clipped values until
        # the next zero_grad, so the clipped total is measured from them.
        grads = [g for m in pending for g in m.grads]
        clipped = bool(trainer.gradient_clip_val) and bool(grads)
        if clipped:
            parts.append((stats.total_norm(grads), sharded.norm(2.0)))
        if loss is not None and self._write_scalars:
            if self._sharded:  # the mean over the ranks joins the step's one all-reduce
                parts.append((loss.detach().reshape(1), sharded.MEAN))
            else:
                parts.append((self._logged_loss(trainer, loss), sharded.SAME))
        first_bad = self._first_bad_step
        if first_bad is not None:
            # None yet (-1) travels as +inf, so that the earliest step over the ranks is the min.
            bad = first_bad.reshape(1).to(stats.exact_dtype(first_bad.device))
            parts.append((torch.where(bad < 0, math.inf, bad), sharded.MIN))
            self._first_bad_step = None
        activations = dict(self._probe.stats) if self._write_scalars else {}
        # Activation histograms (on request): the outputs the probe kept, under the layer's tag.
        activation_values = {
            self._tags.layer(layer): values for layer, values in self._probe.values.items()
        }
        self._probe.stats, self._probe.values = {}, {}
        # Each rank's share of dead, saturated or alike units is of its own batch: their mean.
        parts += [(a, sharded.MEAN) for a in activations.values()]
        followed = bool(self._carried)  # the carried-gradient check ran: 0 unless measured
        carried_pairs = [c for c in self._carried if c is not None]
        carried = torch.stack(carried_pairs).norm(dim=0) if carried_pairs else None
        self._carried = []
        if carried is not None:
            parts.append((carried, sharded.norm(2.0)))
        scaler = self._scaler
        amp_scale = (
            scaler._get_scale_async() if scaler is not None and scaler.is_enabled() else None
        )
        if amp_scale is not None:
            parts.append((amp_scale.detach().reshape(1).float(), sharded.SAME))
        # every_step: the steps since the last logging step, this one included, in the transfer.
        buffered = bool(self._buffer.records) and self._write_scalars
        if buffered:
            parts += self._buffer.parts(self._sharded)
        jobs_tensors: list[Tensor] = []
        if self._write_hist and self._tb is not None:
            for m in pending:
                grads = zip(m.grad_names, m.grad_copies or [], strict=False)
                jobs_tensors += [t for n, t in grads if self._drawn(m.grad_numels[n])]
                weights = zip(m.weight_names, m.before or [], strict=False)
                jobs_tensors += [t for n, t in weights if self._drawn(m.weight_numels[n])]
            jobs_tensors += list(activation_values.values())
            if self._sharded:
                parts += sharded.histogram_parts(jobs_tensors)
            else:
                parts += [(t, sharded.SAME) for t in histograms.device_stats(jobs_tensors)]

        if self._sharded:
            host = stats.to_host(sharded.all_reduce(parts))  # the step's one all-reduce
        else:
            host = stats.to_host([t for t, _ in parts])  # the one transfer of the step
        measured = [(m.optimizer_index, stats.read(m, host)) for m in pending]
        scale = next((v.scale for _, v in measured if v.scale != 1.0), 1.0)
        clipped_total = next(host)[0] / scale if clipped else None
        loss_value = next(host)[0] if loss is not None and self._write_scalars else None
        bad_step = next(host)[0] if first_bad is not None else math.inf
        activation_stats = {
            self._tags.layer(layer): dict(zip(STATS, next(host), strict=True))
            for layer in activations
        }
        if activation_stats:  # what the probe decides its next measured step from
            shares = [values[stat] for values in activation_stats.values() for stat in STATS[1:]]
            self._probe.largest_share = max(shares)
        carried_share = 0.0 if followed else None
        if carried is not None:
            carried_norm, fresh_norm = next(host)
            ok = math.isfinite(carried_norm) and math.isfinite(fresh_norm) and fresh_norm > 0
            carried_share = carried_norm / fresh_norm if ok else None
        amp_scale_value = next(host)[0] if amp_scale is not None else None
        steps = self._buffer.read(host, self._sharded) if buffered else []
        every_stepped = len(trainer.optimizers) <= 1 or len({i for i, _ in measured}) == len(
            trainer.optimizers
        )
        scalars = step_scalars(
            measured,
            self._tags,
            self.norm_types,
            every_stepped,
            clipped_total,
            weight_norms=self.log_weight_norms,
            update_ratios=self.log_update_ratio,
        )
        if self._write_scalars:
            alerts = self.health.observe(
                Observation(
                    step=self._step,
                    layer_norms=scalars.layer_norms,
                    totals=scalars.totals,
                    nonfinite=scalars.nonfinite,
                    update_ratios=scalars.update_ratios,
                    loss=loss_value,
                    first_bad_step=int(bad_step) if math.isfinite(bad_step) else None,
                    overflow_expected=scaler is not None,
                    no_gradient=self._no_gradient,
                    not_optimized=self._not_optimized,
                    activations=activation_stats,
                    amp_scale=amp_scale_value,
                    weight_norms=scalars.weight_norms,
                    carried_gradient=carried_share,
                    low_precision=self._low_precision,
                )
            )
            if self.on_nonfinite == "stop" and self.health.nonfinite_now():
                trainer.should_stop = True
        else:
            alerts = []
        events, found, spike_alerts = self._every_step_events(trainer, steps)
        alerts += spike_alerts
        hists = []
        if jobs_tensors and self._tb is not None and (self._sharded or trainer.is_global_zero):
            # Under sharding every rank bins its shards: the counts are summed over the ranks.
            jobs = self._histogram_jobs(pending, measured)
            # Their norms are not among the scalars: NaN has them taken with the bins.
            jobs += [
                histograms.Job(f"activation_hist/{layer}", values, math.nan)
                for layer, values in activation_values.items()
            ]
            binned = sharded.histograms if self._sharded else histograms.histograms
            hists = binned(jobs, host, self.bins)
        if not trainer.is_global_zero:
            # Other ranks hold the same all-reduced gradients and loss: they keep the same alert
            # state (so `should_stop` agrees on every rank without a collective of its own) but
            # write nothing.
            return
        self._raise_alerts(alerts)
        # Every step's events but this one's, which is written in full below.
        events = [e for e in events if e[0] != self._step]
        writers.write_scalar_steps(trainer.loggers, events)
        if self._write_scalars:
            for layer, values in activation_stats.items():
                for stat in STATS[1:]:
                    scalars.metrics[f"activation/{stat}/{layer}"] = values[stat]
            scalars.metrics.update(self._spikes.tags(self._step, found))
            log10 = first_screen.log10_scalars(scalars.layer_norms, scalars.update_ratios)
            writers.write_scalars(trainer.loggers, scalars.metrics, self._step, log10)
        if hists:
            writers.write_histograms(self._tb, hists, self._step)

    def _flush_steps(self, trainer: "pl.Trainer") -> None:
        """every_step: the steps not yet written (after the last logging step), in a transfer
        of their own; their spikes checked, their alerts raised."""
        if not self._buffer.records:
            return
        parts = self._buffer.parts(self._sharded)
        if self._sharded:
            host = stats.to_host(sharded.all_reduce(parts))
        else:
            host = stats.to_host([t for t, _ in parts])
        steps = self._buffer.read(host, self._sharded)
        events, _, alerts = self._every_step_events(trainer, steps)
        if not trainer.is_global_zero:
            return
        self._raise_alerts(alerts)
        writers.write_scalar_steps(trainer.loggers, events)

    def _every_step_events(
        self, trainer: "pl.Trainer", steps: list[StepValues]
    ) -> tuple[list[ScalarStep], dict[int, dict[str, float]], list[Alert]]:
        """every_step: each step's event, its spikes, and their alerts, recorded with the others
        (``gradients.json``)."""
        spikes_ = None if self.on_spike == "off" else self._spikes
        events, found, alerts = checked_events(
            steps, self._tags, self.norm_types, len(trainer.optimizers), spikes_
        )
        for alert in alerts:
            self.health.add(alert)
        return events, found, alerts

    def _raise_alerts(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            rank_zero_warn(GradientAlert(f"GradientMonitor: {alert.line()}", alert))
            if self._tb is not None:
                writers.write_alert(self._tb, alert)

    @staticmethod
    def _logged_loss(trainer: "pl.Trainer", loss: Tensor) -> Tensor:
        """The step's loss as ``self.log(..., sync_dist=True)`` logs it: under data parallelism
        the mean of the ranks' losses (one small all-reduce, on logging steps only), so every
        rank's alerts quote the logged loss and fire at the single-process run's steps. Like
        DDP's gradient average, the mean does not weight the ranks by their shares of the batch.
        """
        loss = loss.detach().reshape(1)
        if trainer.world_size == 1:
            return loss
        # A copy (all_reduce is in place; the step's output is the module's), in float32 or
        # float64 as Lightning reduces logged values.
        dtype = loss.dtype if loss.dtype in (torch.float32, torch.float64) else torch.float32
        loss = loss.to(dtype, copy=True)
        torch.distributed.all_reduce(loss)
        return loss.div_(trainer.world_size)

    def _histogram_jobs(
        self, pending: list[Measurement], measured: list[tuple[int, stats.HostValues]]
    ) -> list[histograms.Job]:
        """The step's gradient and weight copies to bin, in ``device_stats``'s order."""
        jobs = []
        for m, (_, values) in zip(pending, measured, strict=True):
            scale = values.scale
            for name, copy in zip(m.grad_names, m.grad_copies or [], strict=True):
                numel = m.grad_numels[name]
                if not self._drawn(numel):
                    continue
                # The norm of the copy as it is (still scaled where the values are).
                norm = values.grad_norms[2.0][name] * scale
                tag = f"grad_hist/{self._tags.param(name)}"
                jobs.append(histograms.Job(tag, copy, norm, scale, numel=numel))
            for name, copy in zip(m.weight_names, m.before or [], strict=True):
                numel = m.weight_numels[name]
                if not self._drawn(numel):
                    continue
                norm = values.weight_norms[name]
                tag = f"weight_hist/{self._tags.param(name)}"
                jobs.append(histograms.Job(tag, copy, norm, numel=numel))
        return jobs

    def _drawn(self, numel: int) -> bool:
        """Whether a tensor of ``numel`` values (the whole tensor's, under sharding: every rank
        decides alike) gets a histogram: below ``histogram_min_values`` values it would be a few
        spikes with overlapping labels, and its norm scalars say the same."""
        return numel >= self.histogram_min_values

    def _track_nonfinite(self, params: list[Tensor], step: int) -> None:
        grads = [stored_values(p.grad) for p in params if p.grad is not None]
        if not grads:
            return
        bad = stats.any_nonfinite(grads)
        device = bad.device
        if self._first_bad_step is None or self._first_bad_step.device != device:
            self._first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        first = self._first_bad_step
        self._first_bad_step = torch.where(bad & (first < 0), step, first)

    def _warn_if_stepped_outside_lightning(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule"
    ) -> None:
        """Manual optimization with raw optimizers (``self.optimizers(use_pl_optimizer=False)``)
        steps without Lightning's ``on_before_optimizer_step``: say so once, and how to fix it."""
        if not self._enabled or pl_module.automatic_optimization:
            return
        if not any(p.grad is not None for p in pl_module.parameters()):
            return
        self._warned_unmeasured = True
        rank_zero_warn(
            "GradientMonitor: the module's optimizers step outside Lightning (manual optimization"
            " with `self.optimizers(use_pl_optimizer=False)` or optimizers of its own), so"
            " `on_before_optimizer_step` never runs and no gradient is logged. Step the"
            " optimizers that `self.optimizers()` returns (`opt.step()`).",
            category=GradientAlert,
        )


def _index_of(optimizer: Optimizer, optimizers: list[Optimizer]) -> int:
    return next((i for i, o in enumerate(optimizers) if o is optimizer), 0)
