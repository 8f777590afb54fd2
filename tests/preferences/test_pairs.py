from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.special import ndtr
from scipy.stats import spearmanr

from personascope.errors import PersonascopeError
from personascope.preferences.pairs import (
    ActiveStep,
    converged,
    default_budget,
    initial_pairs,
    next_pairs,
    run_active,
)
from personascope.preferences.thurstonian import ThurstonianFit


def unordered(pairs: np.ndarray) -> set[tuple[int, int]]:
    return {(int(min(a, b)), int(max(a, b))) for a, b in pairs}


@pytest.mark.parametrize(("n", "degree"), [(2, 1), (3, 2), (10, 3), (57, 2), (200, 5), (30, 29)])
def test_initial_pairs_degree_and_no_repeats(n: int, degree: int) -> None:
    pairs = initial_pairs(n, degree=degree, seed=1)
    assert pairs.dtype == np.int64 and pairs.shape[1] == 2
    assert np.all(pairs[:, 0] != pairs[:, 1])
    assert len(unordered(pairs)) == len(pairs)
    assert np.bincount(pairs.reshape(-1), minlength=n).min() >= degree
    assert pairs.min() >= 0 and pairs.max() < n
    assert len(pairs) <= math.ceil(n * degree / 2) + n  # sparse: about n·degree/2


def test_initial_pairs_is_deterministic_and_orientation_is_mixed() -> None:
    a = initial_pairs(100, degree=2, seed=7)
    np.testing.assert_array_equal(a, initial_pairs(100, degree=2, seed=7))
    assert not np.array_equal(a, initial_pairs(100, degree=2, seed=8))
    assert 0.3 < np.mean(a[:, 0] < a[:, 1]) < 0.7


@pytest.mark.parametrize(("n", "degree"), [(1, 1), (5, 5), (5, 0)])
def test_initial_pairs_rejects_impossible_requests(n: int, degree: int) -> None:
    with pytest.raises(PersonascopeError):
        initial_pairs(n, degree=degree)


def test_default_budget() -> None:
    assert default_budget(500) == math.ceil(2 * 500 * math.log2(500)) == 8966
    assert default_budget(2) == 4
    with pytest.raises(PersonascopeError):
        default_budget(1)


def test_converged_uses_rank_correlation() -> None:
    mu = np.arange(20.0)
    assert converged(mu, mu**3)  # same order, different values
    assert not converged(mu, mu[::-1])
    assert not converged(mu, np.zeros(20))  # undefined correlation is not convergence
    assert converged(mu, mu + np.r_[1.5, np.zeros(19)], threshold=0.99)
    with pytest.raises(PersonascopeError):
        converged(mu, mu[:5])


def fit_of(mu: np.ndarray, sigma: np.ndarray | None = None) -> ThurstonianFit:
    return ThurstonianFit(
        mu=np.asarray(mu, dtype=float),
        sigma=np.ones(len(mu)) if sigma is None else sigma,
        nll=0.0,
        converged=True,
        n_iter=0,
    )


def test_next_pairs_prefers_close_pairs_and_never_repeats() -> None:
    n = 40
    fit = fit_of(np.linspace(-3, 3, n))
    existing = initial_pairs(n, degree=2, seed=0)
    counts = np.bincount(existing.reshape(-1), minlength=n)
    new = next_pairs(fit, counts, existing, batch_size=30, seed=0)
    assert new.shape == (30, 2)
    assert not unordered(new) & unordered(existing)
    assert len(unordered(new)) == 30
    gap_new = np.abs(fit.mu[new[:, 0]] - fit.mu[new[:, 1]]).mean()
    i, j = np.triu_indices(n, k=1)
    assert gap_new < 0.25 * np.abs(fit.mu[i] - fit.mu[j]).mean()


def test_next_pairs_accounts_for_sigma() -> None:
    # Items 0-1 and 2-3 are equally far apart in μ, but 2 and 3 are much noisier: that pair is the less certain one.
    fit = fit_of(np.array([0.0, 1.0, 5.0, 6.0]), sigma=np.array([0.1, 0.1, 5.0, 5.0]))
    new = next_pairs(fit, np.zeros(4), np.zeros((0, 2)), batch_size=1)
    assert unordered(new) == {(2, 3)}


def test_next_pairs_prefers_under_compared_items() -> None:
    n = 30
    fit = fit_of(np.zeros(n))  # all pairs equally close: only the counts decide
    counts = np.full(n, 20)
    counts[:6] = 0
    new = next_pairs(fit, counts, np.zeros((0, 2)), batch_size=3, seed=0)
    assert set(new.reshape(-1).tolist()) <= set(range(6))


def test_next_pairs_spreads_a_batch_and_runs_out_cleanly() -> None:
    n = 50
    fit = fit_of(np.r_[np.zeros(10), np.linspace(5, 50, 40)])  # ten tied items, the rest far apart
    new = next_pairs(fit, np.zeros(n), np.zeros((0, 2)), batch_size=50, seed=0)
    assert np.bincount(new.reshape(-1), minlength=n).max() <= 2  # cap = ceil(2·50/50)
    small = fit_of(np.zeros(4))
    every = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3]])
    assert unordered(next_pairs(small, np.zeros(4), every, batch_size=5)) == {(2, 3)}
    assert next_pairs(small, np.zeros(4), np.r_[every, [[3, 2]]], batch_size=5).shape == (0, 2)
    with pytest.raises(PersonascopeError):
        next_pairs(small, np.zeros(3), every, batch_size=5)
    with pytest.raises(PersonascopeError):
        next_pairs(small, np.zeros(4), every, batch_size=0)


def test_next_pairs_samples_candidates_for_large_pools() -> None:
    n = 400
    fit = fit_of(np.random.default_rng(0).normal(size=n))
    new = next_pairs(fit, np.zeros(n), np.zeros((0, 2)), batch_size=100, seed=0, max_candidates=5000)
    assert new.shape == (100, 2) and len(unordered(new)) == 100


def make_judge(mu: np.ndarray, sigma: float, rng: np.random.Generator | None = None):  # type: ignore[no-untyped-def]
    def judge(pairs: np.ndarray) -> np.ndarray:
        p = ndtr((mu[pairs[:, 0]] - mu[pairs[:, 1]]) / (sigma * math.sqrt(2)))
        return p if rng is None else rng.binomial(8, p) / 8

    return judge


def test_run_active_converges_and_recovers_order() -> None:
    rng = np.random.default_rng(0)
    n = 80
    mu = rng.normal(size=n)
    steps: list[ActiveStep] = []
    pairs, p, fit = run_active(n, make_judge(mu, 0.5, rng), seed=0, on_batch=steps.append)
    budget = default_budget(n)
    assert len(pairs) == len(p) <= budget
    assert len(unordered(pairs)) == len(pairs)
    assert spearmanr(fit.mu, mu).statistic > 0.95
    assert steps[0].round == 0 and math.isnan(steps[0].spearman)
    assert [s.round for s in steps] == list(range(len(steps)))
    assert steps[-1].fit is fit and len(steps[-1].pairs) == len(pairs)
    if len(pairs) < budget:  # stopped early: the last step met the threshold
        assert steps[-1].spearman >= 0.99


def test_run_active_respects_budget_and_batch_size() -> None:
    mu = np.linspace(-2, 2, 30)
    sizes: list[int] = []
    pairs, _, _ = run_active(
        30,
        make_judge(mu, 0.5),
        budget=70,
        batch_size=10,
        threshold=1.1,  # never converges: spend the budget
        on_batch=lambda s: sizes.append(len(s.pairs)),
    )
    assert len(pairs) == 70
    assert sizes[0] == 30 and all(b - a == 10 for a, b in itertools.pairwise(sizes))
    short, _, _ = run_active(30, make_judge(mu, 0.5), budget=12)
    assert len(short) == 12


def test_run_active_checks_the_judge() -> None:
    with pytest.raises(PersonascopeError, match="judge_fn returned 1 values"):
        run_active(10, lambda pairs: np.array([0.5]))
    with pytest.raises(PersonascopeError, match="outside"):
        run_active(10, lambda pairs: np.full(len(pairs), 2.0))
    with pytest.raises(PersonascopeError, match="budget"):
        run_active(10, lambda pairs: np.full(len(pairs), 0.5), budget=0)
