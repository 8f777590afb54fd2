"""Which pairs to compare: a random starting graph, then active selection of informative pairs.

The loop follows the active-learning recipe used for utility elicitation (Mazeika et al. 2025, "Utility
Engineering"): start from a sparse random comparison graph in which every item appears a few times, fit Thurstonian
utilities, then repeatedly ask about the pairs the current fit is least sure of — items whose utilities are close
relative to their noise — while spreading comparisons over items that have been compared least. Stop when the
budget is spent or the ranking stops moving.

Nothing here calls a model: :func:`run_active` takes a ``judge_fn`` that turns a batch of pairs into choice
probabilities, so the same loop drives a language model, a cached table or a synthetic judge in tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import spearmanr

from personascope.errors import PersonascopeError
from personascope.preferences.thurstonian import ThurstonianFit, fit_thurstonian

__all__ = [
    "ActiveStep",
    "converged",
    "default_budget",
    "initial_pairs",
    "next_pairs",
    "run_active",
]

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]

#: Judge callback for :func:`run_active`: ``[k, 2]`` item pairs → ``[k]`` probabilities that the first is chosen.
JudgeFn = Callable[[IntArray], ArrayLike]


def _check_n(n_items: int) -> int:
    if isinstance(n_items, bool) or not isinstance(n_items, int | np.integer) or n_items < 2:
        raise PersonascopeError(f"n_items must be an integer ≥ 2, got {n_items!r}; pairs need at least two items")
    return int(n_items)


def _keys(pairs: IntArray, n: int) -> NDArray[np.int64]:
    """Order-free integer key of each pair (so (a, b) and (b, a) count as the same comparison)."""
    lo = np.minimum(pairs[:, 0], pairs[:, 1])
    hi = np.maximum(pairs[:, 0], pairs[:, 1])
    return np.asarray(lo * n + hi, dtype=np.int64)


def _orient(pairs: IntArray, rng: np.random.Generator) -> IntArray:
    """Randomise which item is shown first (spreads any position bias evenly over items)."""
    flip = rng.random(pairs.shape[0]) < 0.5
    out = pairs.copy()
    out[flip] = out[flip][:, ::-1]
    return out


def initial_pairs(n_items: int, degree: int = 2, seed: int = 0) -> IntArray:
    """A random comparison graph in which every item appears in at least ``degree`` pairs.

    Built from ``⌈degree/2⌉`` random Hamiltonian cycles (each gives every item two partners), then topped up
    greedily for any item that a repeated edge left short. No self-pairs and no pair twice (in either order); the
    order within a pair and the row order are random. About ``n_items·degree/2`` pairs.
    """
    n = _check_n(n_items)
    if isinstance(degree, bool) or not isinstance(degree, int | np.integer) or not 1 <= degree <= n - 1:
        raise PersonascopeError(f"degree must be an integer in 1..{n - 1} for {n} items, got {degree!r}")
    rng = np.random.default_rng(seed)
    neighbours: list[set[int]] = [set() for _ in range(n)]
    edges: list[tuple[int, int]] = []

    def add(i: int, j: int) -> None:
        if i != j and j not in neighbours[i]:
            neighbours[i].add(j)
            neighbours[j].add(i)
            edges.append((i, j))

    if n >= 3:
        for _ in range(math.ceil(degree / 2)):
            perm = rng.permutation(n)
            for k in range(n):
                add(int(perm[k]), int(perm[(k + 1) % n]))
    deg = np.array([len(s) for s in neighbours])
    while True:
        short = np.flatnonzero(deg < degree)
        if short.size == 0:
            break
        i = int(rng.choice(short))
        partners = [int(j) for j in short if j != i and int(j) not in neighbours[i]]
        if not partners:
            partners = [j for j in range(n) if j != i and j not in neighbours[i]]
        j = int(rng.choice(partners))
        add(i, j)
        deg[i] += 1
        deg[j] += 1
    pairs = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    return _orient(pairs[rng.permutation(pairs.shape[0])], rng)


def default_budget(n_items: int) -> int:
    """Default number of comparisons for ``n`` items: ``⌈2·n·log2 n⌉`` (≈ 9,000 for 500 items)."""
    n = _check_n(n_items)
    return math.ceil(2 * n * math.log2(n))


def converged(prev_mu: ArrayLike, new_mu: ArrayLike, threshold: float = 0.99) -> bool:
    """True when the Spearman rank correlation between two successive utility vectors is at least ``threshold``."""
    a = np.asarray(prev_mu, dtype=np.float64).reshape(-1)
    b = np.asarray(new_mu, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise PersonascopeError(
            f"utility vectors differ in length ({a.size} vs {b.size}); compare fits of one item set"
        )
    rho = _spearman(a, b)
    return bool(np.isfinite(rho) and rho >= threshold)


def _spearman(a: FloatArray, b: FloatArray) -> float:
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def _candidates(n: int, rng: np.random.Generator, max_candidates: int) -> IntArray:
    total = n * (n - 1) // 2
    if total <= max_candidates:
        i, j = np.triu_indices(n, k=1)
        return np.stack([i, j], axis=1).astype(np.int64)
    a = rng.integers(0, n, size=max_candidates)
    b = (a + rng.integers(1, n, size=max_candidates)) % n
    keys = np.unique(np.minimum(a, b) * n + np.maximum(a, b))
    return np.stack([keys // n, keys % n], axis=1).astype(np.int64)


def next_pairs(
    fit: ThurstonianFit,
    counts_per_item: ArrayLike,
    existing_pairs: ArrayLike,
    batch_size: int,
    seed: int = 0,
    *,
    count_weight: float = 0.5,
    max_candidates: int = 200_000,
) -> IntArray:
    """Choose up to ``batch_size`` new pairs that are uncertain under ``fit`` and involve little-compared items.

    Each candidate pair ``(a, b)`` gets the score (lower is better)

        score = |μ_a − μ_b| / √(σ_a² + σ_b²)  +  count_weight · (c_a + c_b) / (2·max(1, mean c))

    The first term is ``|z|``, the probit of the predicted choice probability: 0 for a coin flip, large for a
    foregone conclusion, so asking about small-``|z|`` pairs is where an answer moves the fit most. The second
    term is the pair's mean comparison count ``c`` relative to the average item, so with the default weight an item
    compared twice as often as average costs as much as half a standard deviation of closeness. Items never
    compared score 0 on it and are picked first.

    Pairs already in ``existing_pairs`` (in either order) are never proposed. Within one batch an item is used at
    most ``max(1, ⌈2·batch_size/n_items⌉)`` times while other good pairs remain, so a cluster of close items
    cannot take the whole batch. All pairs are candidates up to ``max_candidates`` of them; beyond that a
    random sample of that size is scored. Fewer than ``batch_size`` pairs come back only when fewer new
    candidates exist. Ties are broken at random (``seed``); the order within a returned pair is random.
    """
    n = fit.n_items
    counts = np.asarray(counts_per_item, dtype=np.float64).reshape(-1)
    if counts.shape[0] != n:
        raise PersonascopeError(
            f"counts_per_item has {counts.shape[0]} entries but the fit has {n} items; pass one count per item"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise PersonascopeError(f"batch_size must be a positive integer, got {batch_size!r}")
    existing = np.asarray(existing_pairs, dtype=np.int64).reshape(-1, 2)
    rng = np.random.default_rng(seed)
    cand = _candidates(n, rng, max_candidates)
    if existing.size:
        cand = cand[~np.isin(_keys(cand, n), _keys(existing, n))]
    if cand.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.int64)
    a, b = cand[:, 0], cand[:, 1]
    closeness = np.abs(fit.mu[a] - fit.mu[b]) / np.sqrt(fit.sigma[a] ** 2 + fit.sigma[b] ** 2)
    load = (counts[a] + counts[b]) / (2.0 * max(1.0, float(counts.mean())))
    score = np.asarray(closeness + count_weight * load, dtype=np.float64)
    jitter = rng.random(size=(len(score),))
    order = np.lexsort((jitter, score))
    cap = max(1, math.ceil(2 * int(batch_size) / n))
    used = np.zeros(n, dtype=np.int64)
    taken = np.zeros(cand.shape[0], dtype=bool)
    chosen: list[int] = []
    for limit in (cap, None):
        for k in order:
            if len(chosen) >= batch_size:
                break
            if taken[k]:
                continue
            i, j = int(a[k]), int(b[k])
            if limit is not None and (used[i] >= limit or used[j] >= limit):
                continue
            taken[k] = True
            chosen.append(int(k))
            used[i] += 1
            used[j] += 1
        if len(chosen) >= batch_size:
            break
    return _orient(cand[np.asarray(chosen, dtype=np.int64)], rng)


@dataclass
class ActiveStep:
    """Progress of :func:`run_active` after one round (round 0 is the initial random graph).

    ``pairs`` and ``p`` hold every comparison so far; ``spearman`` is the rank correlation of ``fit.mu`` with the
    previous round's (``nan`` in round 0).
    """

    round: int
    pairs: IntArray
    p: FloatArray
    fit: ThurstonianFit
    spearman: float
    budget: int


def _judge(judge_fn: JudgeFn, batch: IntArray) -> FloatArray:
    out = np.asarray(judge_fn(batch), dtype=np.float64).reshape(-1)
    if out.shape[0] != batch.shape[0]:
        raise PersonascopeError(
            f"judge_fn returned {out.shape[0]} values for {batch.shape[0]} pairs; return one probability per pair"
        )
    if not np.all(np.isfinite(out)) or np.any(out < 0) or np.any(out > 1):
        raise PersonascopeError("judge_fn returned values outside [0, 1]; return P(first item chosen) for each pair")
    return out


def run_active(
    n_items: int,
    judge_fn: JudgeFn,
    budget: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    on_batch: Callable[[ActiveStep], None] | None = None,
    *,
    initial_degree: int = 2,
    threshold: float = 0.99,
    fit_kwargs: dict[str, Any] | None = None,
) -> tuple[IntArray, FloatArray, ThurstonianFit]:
    """Elicit utilities for ``n_items`` items with active pair selection.

    1. Ask ``judge_fn`` about a random graph where each item appears ``initial_degree`` times
       (:func:`initial_pairs`, cut to ``budget`` if it is larger) and fit (:func:`fit_thurstonian`).
    2. Repeat: choose ``batch_size`` new pairs (:func:`next_pairs`), ask ``judge_fn``, refit warm-started from the
       previous fit. Stop when ``budget`` comparisons are used, when no new pair is left, or when the ranking
       has settled: Spearman(previous μ, new μ) ≥ ``threshold`` (:func:`converged`).

    Args:
        n_items: number of items (tasks).
        judge_fn: ``[k, 2]`` pairs of item indices → ``[k]`` probabilities that the first item is chosen.
        budget: total comparisons allowed; ``None`` means :func:`default_budget`.
        batch_size: pairs per active round; ``None`` means ``n_items`` (about two new comparisons per item).
        seed: seeds the initial graph and the tie-breaking in each round.
        on_batch: called with an :class:`ActiveStep` after every fit (for progress bars or checkpoints).
        initial_degree: comparisons per item in the initial graph.
        threshold: Spearman correlation between successive fits that counts as converged.
        fit_kwargs: extra arguments for :func:`fit_thurstonian` (e.g. ``sigma_reg``).

    Returns:
        ``(pairs [M, 2], p [M], fit)``: every comparison asked, its answer, and the final fit.
    """
    n = _check_n(n_items)
    budget = default_budget(n) if budget is None else budget
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < 1:
        raise PersonascopeError(f"budget must be a positive integer number of comparisons, got {budget!r}")
    batch = n if batch_size is None else batch_size
    if isinstance(batch, bool) or not isinstance(batch, int | np.integer) or batch < 1:
        raise PersonascopeError(f"batch_size must be a positive integer, got {batch_size!r}")
    kwargs = dict(fit_kwargs or {})
    pairs = initial_pairs(n, degree=initial_degree, seed=seed)[: int(budget)]
    p = _judge(judge_fn, pairs)
    fit = fit_thurstonian(n, pairs, p, **kwargs)
    if on_batch is not None:
        on_batch(ActiveStep(0, pairs, p, fit, math.nan, int(budget)))
    round_no = 0
    while pairs.shape[0] < budget:
        round_no += 1
        counts = np.bincount(pairs.reshape(-1), minlength=n)
        k = min(int(batch), int(budget) - pairs.shape[0])
        new = next_pairs(fit, counts, pairs, k, seed=seed + round_no)
        if new.shape[0] == 0:
            break
        p_new = _judge(judge_fn, new)
        pairs = np.concatenate([pairs, new])
        p = np.concatenate([p, p_new])
        new_fit = fit_thurstonian(n, pairs, p, init=fit, **kwargs)
        rho = _spearman(fit.mu, new_fit.mu)
        fit = new_fit
        if on_batch is not None:
            on_batch(ActiveStep(round_no, pairs, p, fit, rho, int(budget)))
        if np.isfinite(rho) and rho >= threshold:
            break
    return pairs, p, fit
