"""The gpu block (only where torch.cuda.is_available()): the mid block's contenders on CUDA, and
one more that makes any host sync on a step that writes nothing an error."""

from bench_parts.blocks import Specs, mid


def contenders(quick: bool, notes: list[str]) -> Specs:
    specs = mid.contenders(quick, notes, block="gpu", device="cuda")
    specs.add(
        "sync_check",
        "GradientMonitor defaults, sync_debug_mode=error off-cadence",
        "monitored",
        {**mid.params(quick, "cuda"), "kind": "monitor", "sync_check": True},
        "none",
    )
    return specs
