"""Small statistics used by reports: means with t-intervals, Pearson r with bootstrap intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_ci(values: Sequence[float | None], level: float = 0.95) -> tuple[float, float, int]:
    """Mean and the half-width of its ``level`` t-interval, over the non-None values, and their count.

    With fewer than two values the half-width is ``nan``; with none the mean is ``nan`` too.
    """
    from scipy import stats

    real = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(real)
    if n == 0:
        return float("nan"), float("nan"), 0
    if n == 1:
        return float(real[0]), float("nan"), 1
    sem = real.std(ddof=1) / math.sqrt(n)
    return float(real.mean()), float(stats.t.ppf(0.5 + level / 2, n - 1) * sem), n


def pearson_ci(
    x: Sequence[float], y: Sequence[float], *, level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Pearson r with a percentile bootstrap interval ``(r, low, high)``; ``nan`` when undefined."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(xa) < 3 or xa.std() == 0 or ya.std() == 0:
        return float("nan"), float("nan"), float("nan")
    r = float(np.corrcoef(xa, ya)[0, 1])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(xa), size=(n_boot, len(xa)))
    xs, ys = xa[idx], ya[idx]
    xs = xs - xs.mean(1, keepdims=True)
    ys = ys - ys.mean(1, keepdims=True)
    denom = np.sqrt((xs**2).sum(1) * (ys**2).sum(1))
    valid = denom > 0
    boots = (xs * ys).sum(1)[valid] / denom[valid]
    alpha = (1 - level) / 2
    return r, float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))
