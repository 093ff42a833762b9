"""The monitor's argument checks: one line each, naming the argument and what is allowed, raised
as ValueError when the monitor is built (so a config is checked before training by building it)."""

import math
from collections.abc import Callable, Sequence
from typing import Any


def check_int(
    name: str, value: Any, minimum: int, maximum: int | None = None, allow_none: bool = False
) -> None:
    if value is None and allow_none:
        return
    number = isinstance(value, int) and not isinstance(value, bool)
    if not number or value < minimum or (maximum is not None and value > maximum):
        allowed = f"an int >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        allowed += " or None" if allow_none else ""
        raise ValueError(f"GradientMonitor: {name} must be {allowed}, got {value!r}")


def check_number(name: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not ok(value):
        raise ValueError(f"GradientMonitor: {name} must be {allowed}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"GradientMonitor: {name} must be true or false, got {value!r}")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"GradientMonitor: {name} must be one of {list(allowed)}, got {value!r}")


def norm_types(values: Any) -> list[float]:
    """The norm types to log: 2 first, always, then the others once each (``"inf"`` -> inf)."""
    # A Sequence: lists, tuples and Hydra's ListConfig.
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise ValueError(
            f"GradientMonitor: norm_types must be a list of numbers > 0 or 'inf', got {values!r}"
        )
    return list(dict.fromkeys([2.0, *(_norm_type(v) for v in values)]))


def _norm_type(value: Any) -> float:
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity"):
        return math.inf
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not value > 0 or math.isnan(value):
        raise ValueError(
            f"GradientMonitor: norm_types must hold numbers > 0 or 'inf', got {value!r}"
        )
    return float(value)
