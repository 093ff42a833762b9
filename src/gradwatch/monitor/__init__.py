"""The gradient monitor: a Lightning callback that logs per-layer gradient statistics and names
what goes wrong. One idea per file:

- ``callback.py``: :class:`GradientMonitor`, the hooks and their cadence; delegates the rest
- ``arguments.py``: the argument checks, one line each, raised when the monitor is built
- ``names.py``: which parameters, their names and layers, and tags that never collide
- ``stats.py``: norms and counts on the gradients' device, and the one transfer to the host
- ``histograms.py``: ``torch.histc`` bins over the finite range, in TensorBoard's form
- ``sharded.py``: under FSDP2, the whole model's values from each rank's shards (all-reduces)
- ``scalars.py``: per parameter, per layer and total values under their tags
- ``health.py``: the alert rules, plain Python over host values, and the run's history
- ``writers.py``: TensorBoard events and every other logger's ``log_metrics``
"""

from gradwatch.monitor.callback import GradientMonitor
from gradwatch.monitor.health import GradientAlert

__all__ = ["GradientAlert", "GradientMonitor"]
