"""LR schedule: warmup, cosine, the floor relative to each phase's peak."""

from __future__ import annotations

import pytest

from deeplm.train.schedule import lr_at


def test_warmup_then_cosine_to_floor():
    total, peak = 100, 1e-3
    lrs = [lr_at(s, total, peak, 0.1, 0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / 10)
    assert lrs[9] == pytest.approx(peak)
    assert all(b <= a + 1e-15 for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay
    assert lrs[-1] == pytest.approx(peak * 0.1)
    assert max(lrs) <= peak


@pytest.mark.parametrize("peak", [3e-4, 3e-5])
def test_floor_scales_with_peak(peak):
    floor = min(lr_at(s, 50, peak, 0.05, 1 / 3) for s in range(50))
    assert floor == pytest.approx(peak / 3)
    assert floor <= peak


def test_floor_above_peak_is_rejected():
    with pytest.raises(ValueError):
        lr_at(0, 10, 1e-3, 0.1, 1.5)


def test_no_warmup():
    assert lr_at(0, 10, 1e-3, 0.0, 0.0) == pytest.approx(1e-3)
