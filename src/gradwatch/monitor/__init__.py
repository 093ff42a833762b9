"""The gradient monitor: a Lightning callback that logs per-layer gradient statistics and names
what goes wrong. One idea per file:

- ``callback.py``: :class:`GradientMonitor`, the hooks and their cadence; delegates the rest
- ``logging_step.py``: a logging step after its optimizer step: one transfer, then the writes
- ``arguments.py``: the argument checks, one line each, raised when the monitor is built
- ``names.py``: which parameters, their names and layers, and tags that never collide
- ``stats.py``: norms and counts on the gradients' device, and the one transfer to the host
- ``histograms.py``: ``torch.histc`` bins over the finite range, in TensorBoard's form
- ``sharded.py``: under FSDP2, the whole model's values from each rank's shards (all-reduces)
- ``scalars.py``: per parameter, per layer and total values under their tags
- ``health.py``: the rules once per episode, causes over symptoms, and the run's history
- ``history.py``: one ``Observation`` per logging step, and their ``History``
- ``rules.py``: the diagnosis rules, plain functions over a history
- ``alerts.py``: an ``Alert`` (kind, layers, step, evidence, fix) and the ``GradientAlert`` warning
- ``activations.py``: dead, saturated and alike units, from hooks on logging steps only
- ``fresh.py``: a logging step's own gradient, against what ``.grad`` holds (no ``zero_grad``)
- ``writers.py``: TensorBoard events and every other logger's ``log_metrics``
"""

from gradwatch.monitor.callback import GradientMonitor
from gradwatch.monitor.health import GradientAlert

__all__ = ["GradientAlert", "GradientMonitor"]
