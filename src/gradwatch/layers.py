"""The layer of a parameter: one rule for the monitor, which writes per-layer tags, and the
report, which reads them back (without importing torch or Lightning)."""


def layer_of(name: str) -> str:
    """The module path before the last dot (``fc1.weight`` -> ``fc1``); a parameter of the
    top-level module is its own layer (``scale`` -> ``scale``)."""
    return name.rsplit(".", 1)[0] if "." in name else name
