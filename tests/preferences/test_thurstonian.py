from __future__ import annotations

import math
from collections.abc import Iterator

import choix
import numpy as np
import pytest
import torch
from scipy.optimize import check_grad
from scipy.special import ndtr
from scipy.stats import spearmanr

from personascope.errors import PersonascopeError
from personascope.preferences.thurstonian import (
    ThurstonianFit,
    _objective,
    _validate,
    fit_thurstonian,
    fit_thurstonian_adam,
    holdout_evaluate,
    log_loss,
    pair_accuracy,
)


def random_pairs(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    i, j = np.triu_indices(n, k=1)
    pick = rng.choice(i.size, size=m, replace=False)
    pairs = np.stack([i[pick], j[pick]], axis=1)
    flip = rng.random(m) < 0.5
    pairs[flip] = pairs[flip][:, ::-1]
    return pairs.astype(np.int64)


def true_prob(mu: np.ndarray, sigma: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    a, b = pairs[:, 0], pairs[:, 1]
    return ndtr((mu[a] - mu[b]) / np.sqrt(sigma[a] ** 2 + sigma[b] ** 2))


@pytest.fixture(scope="module")
def synthetic() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n, m = 100, 3000
    mu = rng.normal(size=n)
    sigma = 0.5 * np.exp(rng.normal(scale=0.5, size=n))
    pairs = random_pairs(rng, n, m)
    return mu, sigma, pairs, true_prob(mu, sigma, pairs)


def test_recovers_known_utilities(synthetic: tuple[np.ndarray, ...]) -> None:
    mu, sigma, pairs, p = synthetic
    fit = fit_thurstonian(mu.size, pairs, p)
    assert fit.converged
    assert np.corrcoef(fit.mu, mu)[0, 1] > 0.98
    assert spearmanr(fit.sigma, sigma).statistic > 0.7  # σ ordering roughly recovered
    # Reported on a fixed scale, without changing any probability.
    assert abs(fit.mu.mean()) < 1e-9 and abs(fit.mu.std() - 1) < 1e-9
    assert np.all(fit.sigma > 0)
    assert fit.nll == pytest.approx(log_loss(fit, pairs, p) * len(p), rel=1e-9)
    assert log_loss(fit, pairs, p) <= log_loss(ThurstonianFit(mu, sigma, 0.0, True, 0), pairs, p) + 1e-3


def test_recovers_from_sampled_soft_choices() -> None:
    rng = np.random.default_rng(1)
    n, m = 80, 2000
    mu = rng.normal(size=n)
    sigma = np.full(n, 0.6)
    pairs = random_pairs(rng, n, m)
    p = rng.binomial(10, true_prob(mu, sigma, pairs)) / 10
    fit = fit_thurstonian(n, pairs, p)
    assert np.corrcoef(fit.mu, mu)[0, 1] > 0.98


@pytest.mark.parametrize("case", ["soft", "hard", "far_tail", "weighted"])
def test_analytic_gradient_matches_finite_differences(case: str) -> None:
    rng = np.random.default_rng(2)
    n, m = 12, 40
    pairs = random_pairs(rng, n, m)
    p = rng.random(m)
    w = np.ones(m)
    mu = rng.normal(size=n)
    theta = rng.normal(scale=0.4, size=n)
    if case == "hard":
        p = (p > 0.5).astype(float)
    elif case == "far_tail":
        mu = mu * 40.0  # many |z| beyond 30, where the code switches to log_ndtr
        theta = np.zeros(n) - 0.5
    elif case == "weighted":
        w = rng.random(m) * 3
    x = np.concatenate([mu, theta])
    idx, pv, wv = _validate(n, pairs, p, w)

    def f(v: np.ndarray) -> float:
        return _objective(v, n, idx, pv, wv)[0]

    def g(v: np.ndarray) -> np.ndarray:
        return _objective(v, n, idx, pv, wv)[1]

    scale = np.linalg.norm(g(x)) + 1e-12
    assert check_grad(f, g, x, epsilon=1e-6) / scale < 1e-4


def test_objective_values_are_stable_in_the_tails() -> None:
    pairs = np.array([[0, 1], [1, 0]])
    p = np.array([1.0, 0.0])
    x = np.array([60.0, -60.0, 0.0, 0.0])  # z ≈ 85: both log Φ(−z) terms are far beyond float underflow
    f, g = _objective(x, 2, pairs, p, np.ones(2))
    assert np.isfinite(f) and np.all(np.isfinite(g))
    x_bad = np.array([-60.0, 60.0, 0.0, 0.0])
    f_bad, g_bad = _objective(x_bad, 2, pairs, p, np.ones(2))
    assert f_bad > 1000 and np.all(np.isfinite(g_bad))


def test_agrees_with_choix_on_shared_variance_hard_choices() -> None:
    rng = np.random.default_rng(3)
    n, m = 60, 3000
    mu = rng.normal(size=n)
    pairs = random_pairs(rng, n, 1770)  # every pair once
    pairs = np.concatenate([pairs, random_pairs(rng, n, m - 1770)])
    first_wins = rng.random(m) < true_prob(mu, np.ones(n), pairs)
    fit = fit_thurstonian(n, pairs, first_wins.astype(float))
    data = [(int(a), int(b)) if win else (int(b), int(a)) for (a, b), win in zip(pairs, first_wins, strict=True)]
    bt = choix.opt_pairwise(n, data, alpha=1e-4)
    assert np.corrcoef(fit.mu, bt)[0, 1] > 0.97
    assert spearmanr(fit.mu, bt).statistic > 0.97
    assert np.corrcoef(fit.mu, mu)[0, 1] > 0.9


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    # A tiny full-batch problem: extra torch threads only contend for the CPU (10x slower on a busy 2-core box).
    # The autouse fixture in conftest.py restores the thread count too; this keeps the fixture safe on its own.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.usefixtures("one_torch_thread")
def test_adam_reference_reaches_the_same_optimum() -> None:
    rng = np.random.default_rng(4)
    n, m = 30, 300
    mu = rng.normal(size=n)
    sigma = 0.5 * np.exp(rng.normal(scale=0.3, size=n))
    pairs = random_pairs(rng, n, m)
    p = true_prob(mu, sigma, pairs)
    fit = fit_thurstonian(n, pairs, p)
    ref = fit_thurstonian_adam(n, pairs, p, epochs=600)
    assert ref.objective >= fit.objective - 1e-6
    assert ref.objective == pytest.approx(fit.objective, rel=1e-3)
    assert log_loss(ref, pairs, p) == pytest.approx(log_loss(fit, pairs, p), rel=1e-2)
    assert np.corrcoef(ref.mu, fit.mu)[0, 1] > 0.99


def test_weights_equal_repeated_pairs_and_warm_start_changes_nothing(synthetic: tuple[np.ndarray, ...]) -> None:
    mu, _, pairs, p = synthetic
    n = mu.size
    sub, psub = pairs[:600], p[:600]
    doubled = fit_thurstonian(n, np.concatenate([sub, sub[:100]]), np.concatenate([psub, psub[:100]]))
    weights = np.ones(600)
    weights[:100] = 2.0
    weighted = fit_thurstonian(n, sub, psub, weights=weights)
    np.testing.assert_allclose(weighted.mu, doubled.mu, atol=2e-3)
    cold = fit_thurstonian(n, sub, psub, tol=1e-12)
    warm = fit_thurstonian(n, sub, psub, init=cold, tol=1e-12)
    np.testing.assert_allclose(warm.mu, cold.mu, atol=1e-3)
    assert warm.n_iter <= cold.n_iter


def test_prob_and_uncompared_items() -> None:
    pairs = np.array([[0, 1], [1, 2], [0, 2]] * 3)
    p = np.array([0.8, 0.7, 0.9] * 3)
    fit = fit_thurstonian(5, pairs, p)
    assert fit.uncompared.tolist() == [3, 4]
    assert fit.mu[3] == 0 and fit.mu[4] == 0 and fit.sigma[3] == 1
    ranking = fit.ranking().tolist()
    assert [i for i in ranking if i < 3] == [0, 1, 2]
    probs = fit.prob([0, 1], [1, 0])
    assert probs[0] == pytest.approx(1 - probs[1])
    assert probs[0] > 0.5
    assert fit.prob(2, 2) == pytest.approx(0.5)


def test_separable_data_stays_finite() -> None:
    pairs = np.array([[0, 1], [1, 2], [2, 3], [0, 3]])
    fit = fit_thurstonian(4, pairs, np.ones(4))
    assert np.all(np.isfinite(fit.mu)) and np.all(np.isfinite(fit.sigma))
    assert fit.ranking().tolist() == [0, 1, 2, 3]


def test_metrics() -> None:
    fit = ThurstonianFit(mu=np.array([1.0, 0.0, -1.0]), sigma=np.ones(3), nll=0.0, converged=True, n_iter=0)
    pairs = np.array([[0, 1], [1, 2], [2, 0], [0, 2]])
    assert pair_accuracy(fit, pairs, [0.9, 0.6, 0.6, 0.5]) == pytest.approx(2 / 3)  # the tie is left out
    assert math.isnan(pair_accuracy(fit, pairs, [0.5] * 4))
    p = np.array([0.9, 0.6, 0.1, 1.0])
    probs = fit.prob(pairs[:, 0], pairs[:, 1])
    expected = -np.mean(p * np.log(probs) + (1 - p) * np.log(1 - probs))
    assert log_loss(fit, pairs, p) == pytest.approx(expected, rel=1e-10)


def test_holdout_evaluate_is_sane(synthetic: tuple[np.ndarray, ...]) -> None:
    mu, _, pairs, p = synthetic
    res = holdout_evaluate(mu.size, pairs, p, frac=0.05, seed=0)
    assert res["n_test"] == 150 and res["n_train"] == 2850
    assert res["test_accuracy"] > 0.9
    assert res["ceiling_accuracy"] == 1.0
    assert res["test_log_loss"] >= res["ceiling_log_loss"] - 1e-9
    assert res["test_log_loss"] - res["ceiling_log_loss"] < 0.05  # noise-free labels: near the ceiling
    assert 0 <= res["test_tie_fraction"] <= 1
    hard = holdout_evaluate(mu.size, pairs, (p > 0.5).astype(float), frac=0.1, seed=1)
    assert hard["ceiling_log_loss"] == 0.0
    assert hard["test_accuracy"] > 0.85


def _bad_cases() -> list[tuple[str, dict[str, object]]]:
    good_pairs = np.array([[0, 1], [1, 2]])
    return [
        ("out_of_range", {"pairs": np.array([[0, 1], [1, 3]])}),
        ("negative", {"pairs": np.array([[0, 1], [-1, 2]])}),
        ("self_pair", {"pairs": np.array([[0, 1], [2, 2]])}),
        ("p_above_one", {"p_first": [0.5, 1.2]}),
        ("p_below_zero", {"p_first": [-0.1, 0.3]}),
        ("p_nan", {"p_first": [float("nan"), 0.3]}),
        ("length_mismatch", {"p_first": [0.5, 0.5, 0.5]}),
        ("wrong_shape", {"pairs": np.array([0, 1, 2])}),
        ("empty", {"pairs": np.zeros((0, 2), dtype=int), "p_first": []}),
        ("fractional_indices", {"pairs": np.array([[0.5, 1.0], [1.0, 2.0]])}),
        ("too_few_items", {"n_items": 1, "pairs": good_pairs}),
        ("weights_mismatch", {"weights": [1.0]}),
        ("negative_weights", {"weights": [1.0, -1.0]}),
        ("bad_init", {"init": (np.zeros(2), np.ones(2))}),
        ("negative_sigma_reg", {"sigma_reg": -1.0}),
        ("zero_tol", {"tol": 0.0}),
    ]


@pytest.mark.parametrize(("name", "override"), _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_invalid_inputs_raise_one_line_errors(name: str, override: dict[str, object]) -> None:
    args: dict[str, object] = {"n_items": 3, "pairs": np.array([[0, 1], [1, 2]]), "p_first": [0.7, 0.4]}
    args.update(override)
    kwargs = {k: args.pop(k) for k in ("weights", "init", "sigma_reg", "tol") if k in args}
    with pytest.raises(PersonascopeError) as err:
        fit_thurstonian(args["n_items"], args["pairs"], args["p_first"], **kwargs)  # type: ignore[arg-type]
    message = str(err.value)
    assert "\n" not in message and ";" in message  # what is wrong; how to fix it


def test_holdout_rejects_bad_fraction(synthetic: tuple[np.ndarray, ...]) -> None:
    mu, _, pairs, p = synthetic
    with pytest.raises(PersonascopeError, match="frac"):
        holdout_evaluate(mu.size, pairs, p, frac=1.5)
    with pytest.raises(PersonascopeError, match="too few"):
        holdout_evaluate(3, np.array([[0, 1]]), [0.5], frac=0.5)
