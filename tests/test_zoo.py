"""The zoo: every broken training diagnosed with the right kind (and layer) within its first 500
steps, no alert at all on a healthy one, nothing crashes. The fast cases run in `make test`, the
others in the slow suite (`make test-all`, `make zoo`). The fp16 case trains on CUDA where there
is one, else with CPU autocast."""

import pytest

from gradwatch.zoo.cases import CASES
from gradwatch.zoo.run import Result, run_case, table


def ids(cases):
    return [c.name for c in cases]


FAST = [c for c in CASES if c.fast]
SLOW = [c for c in CASES if not c.fast]


def check(case):
    result = run_case(case)
    assert not result.error, result.error
    assert result.right, f"{case.name}: expected {case.expected}, said {result.said}"


@pytest.mark.parametrize("case", FAST, ids=ids(FAST))
def test_fast_case(case):
    check(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=ids(SLOW))
def test_slow_case(case):
    check(case)


def test_the_catalogue_covers_the_issue():
    broken = {c.expected for c in CASES if c.expected}
    assert broken >= {
        "stall",
        "diverging",
        "exploding",
        "vanishing",
        "saturated_units",
        "dead_units",
        "symmetric_units",
        "no_gradient",
        "not_optimized",
        "nonfinite",
        "accumulating",
        "no_signal",
        "skipped_steps",
    }
    assert len([c for c in CASES if c.expected is None]) >= 6


def test_the_table_scores_right_and_wrong():
    stall, healthy = CASES[0], next(c for c in CASES if c.expected is None)
    results = [
        Result(stall, [{"step": 229, "kind": "stall", "layers": []}]),
        Result(healthy, [{"step": 9, "kind": "dead_units", "layers": ["fc1"]}]),
    ]
    text = table(results)
    assert "| stall | 229 | right |" in text and "| dead_units (fc1) | 9 | WRONG |" in text
    assert "recall: 1/1 broken cases diagnosed right; false alarms: 1/1 healthy cases" in text
