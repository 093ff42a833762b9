"""GradientMonitor, the Lightning callback: arguments, hooks and cadence. Every computation is
delegated: statistics on the device (``stats``, ``activations``, ``fresh``, ``every_step``),
tags (``names``), and a logging step's transfer, scalars, alerts and writes after its optimizer
step (``logging_step``)."""

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

from gradwatch.monitor import arguments, first_screen, sharded, spikes, stats
from gradwatch.monitor.activations import ActivationProbe
from gradwatch.monitor.alerts import GradientAlert
from gradwatch.monitor.arguments import check_bool, check_choice, check_int, check_number
from gradwatch.monitor.every_step import StepBuffer, StepRecord
from gradwatch.monitor.fresh import FreshGradients
from gradwatch.monitor.health import Health, Thresholds, format_table
from gradwatch.monitor.logging_step import StepFinisher, TakenStep
from gradwatch.monitor.names import Tags, optimizer_params, parameter_names, stored_values

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
    - ``update_rounded_away/<layer>``, for 16-bit weights only (``bf16-true``, ``16-true``): of the
      values whose gradient was not 0, the share the step left exactly as they were

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
        # The logging step being taken, from its first measurement to its end (on_train_batch_end),
        # and what finishes it (from on_train_start).
        self._taken: TakenStep | None = None
        self._finisher: StepFinisher | None = None
        self._measured_once = self._warned_unmeasured = False
        # FSDP2: every rank measures its shards, and each logging step combines them.
        self._sharded = False
        # Stop mode: the first step with a non-finite gradient, kept on device (no sync).
        self._first_bad_step: Tensor | None = None
        # Parameters that require grad but are in no optimizer's param groups, by name.
        self._unoptimized: list[tuple[str, Tensor]] = []
        self._read_first_loss = False
        self._hooks_allowed = True
        self._fresh = FreshGradients()
        self._low_precision: dict[str, str] = {}  # 16-bit layers' dtypes, from on_train_start
        self._follow_backward = self._every_step_work = False  # set in on_train_start
        # This batch's plan, from on_train_batch_start: whether it writes, whether it logs
        # scalars at the cadence. True until the first batch says otherwise.
        self._batch_writes = self._batch_logs = True
        self._first_steps = True  # the first loss and the check that Lightning steps are pending

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
        if self._tb is not None and trainer.is_global_zero:
            rounded_away = bool(self._low_precision) and self.log_update_ratio
            first_screen.write_layout(self._tb, rounded_away)
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
        self._finisher = StepFinisher(
            tags=self._tags,
            norm_types=self.norm_types,
            health=self.health,
            spikes=self._spikes,
            probe=self._probe,
            buffer=self._buffer,
            scaler=self._scaler,
            tb=self._tb,
            sharded=self._sharded,
            bins=self.bins,
            histogram_min_values=self.histogram_min_values,
            log_weight_norms=self.log_weight_norms,
            log_update_ratio=self.log_update_ratio,
            on_nonfinite=self.on_nonfinite,
            on_spike=self.on_spike,
            low_precision=self._low_precision,
            zero_eps=self._eps_lost_in_float16(trainer),
        )
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
        # The forward is over; detached already unless the backward bypassed Lightning's
        # on_before_backward (a manual step's plain loss.backward()).
        self._probe.detach()
        taken = self._taken
        if taken is None:  # the step's first optimizer
            not_optimized = [name for name, p in self._unoptimized if p.grad is not None]
            taken = self._taken = TakenStep(step, write_scalars, write_hist, not_optimized)
        taken.no_gradient += [
            self._tags.param(n) for n, p in zip(names, params, strict=True) if p.grad is None
        ]
        taken.measurements.append(
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
            taken.carried.append(self._fresh.carried_and_fresh(params))
        if self._skip_if_spike(recorded, params):
            taken.measurements[-1].stepped = False

    def _eps_lost_in_float16(self, trainer: "pl.Trainer") -> dict[str, float]:
        """The float16 layers whose optimizer divides by ``sqrt(v) + eps`` (Adam and its kin)
        with an eps that float16 rounds to 0, with that eps: their moments are float16 like the
        weights, and a value whose gradient and moments are 0 steps by 0/0 = NaN."""
        out = {}
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                eps = group.get("eps")
                if not isinstance(eps, float) or torch.tensor(eps, dtype=torch.float16) != 0:
                    continue
                for p in group["params"]:
                    if p.dtype == torch.float16 and id(p) in self._names:
                        out[self._tags.layer_of_param(self._names[id(p)])] = eps
        return out

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

    def _skip_if_spike(self, recorded: StepRecord | None, params: list[Tensor]) -> bool:
        """``on_spike="skip"``: when the step's total gradient norm is a spike, the optimizer
        does not step: torch's optimizers pass over parameters without a gradient (no update,
        no momentum or Adam moment, no weight decay). True when it skips."""
        if recorded is None or not self._spikes.skip:
            return False
        n = len(recorded.grad_names)
        total = torch.linalg.vector_norm(recorded.norms[:n].double())  # L2 comes first
        if recorded.scale is not None:
            total = total / recorded.scale.double()
        if not self._spikes.should_skip(recorded.step, recorded.optimizer_index, total):
            return False
        for p in params:
            p.grad = None
        return True

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
            or self._taken is not None
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
        if self._taken is not None:
            self._fresh.clear()  # measured: the next logging step follows its own
        if not self._read_first_loss:
            self._read_first_loss = True
            if self.health.observed.first_loss is None:  # a resumed run has its own
                self._take_first_loss(trainer, outputs)
        if self._taken is None:
            if not (self._measured_once or self._warned_unmeasured):
                self._warn_if_stepped_outside_lightning(trainer, pl_module)
            self._first_steps = not (self._measured_once or self._warned_unmeasured)
            return
        taken, self._taken = self._taken, None
        first_bad, self._first_bad_step = self._first_bad_step, None
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        assert self._finisher is not None  # measured: the monitor is on
        self._finisher.finish(trainer, taken, loss if isinstance(loss, Tensor) else None, first_bad)

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
        self._taken = None
        if self._finisher is not None:  # every_step: the steps after the last logging step
            self._finisher.flush_steps(trainer)
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
        if not self._sharded and self._finisher is not None:
            self._finisher.flush_steps(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.health.state_dict(), "spikes": self._spikes.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.health.load_state_dict(state_dict)
        if "spikes" in state_dict:
            self._spikes.load_state_dict(state_dict["spikes"])

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
