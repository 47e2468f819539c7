"""Learning-rate schedules (kdsweep.schedule.lr_factor) as pure functions of the step."""

import math

import pytest

from kdsweep.schedule import lr_factor

WARMUP, TOTAL, MIN_RATIO = 10, 110, 0.1
KINDS = ["cosine", "linear", "constant"]


def factor(step: int, kind: str, warmup: int = WARMUP, min_ratio: float = MIN_RATIO) -> float:
    return lr_factor(step, warmup_steps=warmup, total_steps=TOTAL, kind=kind, min_ratio=min_ratio)


@pytest.mark.parametrize("kind", KINDS)
def test_warmup_is_linear_and_reaches_one(kind):
    values = [factor(s, kind) for s in range(WARMUP)]
    assert values == pytest.approx([(s + 1) / WARMUP for s in range(WARMUP)])
    assert values[0] > 0  # the first step already moves the weights
    assert values[-1] == pytest.approx(1.0)
    assert factor(WARMUP, kind) == pytest.approx(1.0)  # the peak, right after warmup


def test_cosine_decays_monotonically_to_min_ratio():
    values = [factor(s, "cosine") for s in range(WARMUP, TOTAL + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(MIN_RATIO)
    assert factor(WARMUP + (TOTAL - WARMUP) // 2, "cosine") == pytest.approx(MIN_RATIO + (1 - MIN_RATIO) / 2)
    s = WARMUP + 25
    expected = MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * 25 / (TOTAL - WARMUP)))
    assert factor(s, "cosine") == pytest.approx(expected)


def test_linear_decays_linearly_to_min_ratio():
    values = [factor(s, "linear") for s in range(WARMUP, TOTAL + 1)]
    diffs = [a - b for a, b in zip(values, values[1:])]
    assert diffs == pytest.approx([(1 - MIN_RATIO) / (TOTAL - WARMUP)] * len(diffs))
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(MIN_RATIO)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_decay_stays_at_min_ratio_after_total_steps(kind):
    assert [factor(s, kind) for s in (TOTAL, TOTAL + 1, 10 * TOTAL)] == pytest.approx([MIN_RATIO] * 3)


def test_constant_stays_one():
    assert all(factor(s, "constant") == 1.0 for s in range(WARMUP, 3 * TOTAL))


@pytest.mark.parametrize("kind", KINDS)
def test_without_warmup_starts_at_peak(kind):
    assert factor(0, kind, warmup=0) == pytest.approx(1.0)


def test_min_ratio_zero_decays_to_zero():
    assert factor(TOTAL, "cosine", min_ratio=0.0) == pytest.approx(0.0, abs=1e-12)
    assert factor(TOTAL, "linear", min_ratio=0.0) == pytest.approx(0.0, abs=1e-12)


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="unknown schedule"):
        factor(WARMUP + 1, "exponential")
