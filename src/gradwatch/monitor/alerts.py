"""What an alert is: a kind, the layers at fault, the step, the numbers that triggered it and a
suggested fix. The same object is the console's warning, TensorBoard's ``alerts`` text and an entry
of ``gradients.json``."""

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Alert:
    """One diagnosis, at the step its episode starts.

    Attributes:
        step: the logging step it was first seen at.
        kind: what is wrong, one word (``vanishing``, ``dead_units``, ... see ``rules.KINDS``).
        layers: the layers (or parameters) at fault; empty when the whole model is.
        message: the diagnosis in a sentence, with its numbers.
        evidence: the numbers that triggered it, by name (plain floats, ints, strings).
        fix: what usually cures it.
    """

    step: int
    kind: str
    layers: list[str]
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    fix: str = ""

    def line(self) -> str:
        """The one line the console prints: the diagnosis, its kind, then the fix."""
        fix = f" Fix: {self.fix}" if self.fix else ""
        return f"{self.message} [{self.kind}].{fix}"


class GradientAlert(UserWarning):
    """The category of the monitor's console alerts: filter them, or turn them into errors.

    A diagnosis is raised as an instance that carries it: ``kind``, ``layers``, ``step``,
    ``evidence`` and ``fix`` (``warnings.catch_warnings(record=True)`` gives it as
    ``record[i].message``). Notices about the monitor itself (no logger, no histograms) have the
    kind ``notice`` and nothing else.
    """

    def __init__(self, text: str, alert: Alert | None = None) -> None:
        super().__init__(text)
        self.alert = alert
        self.kind = alert.kind if alert else "notice"
        self.layers = list(alert.layers) if alert else []
        self.step = alert.step if alert else None
        self.evidence = dict(alert.evidence) if alert else {}
        self.fix = alert.fix if alert else ""
