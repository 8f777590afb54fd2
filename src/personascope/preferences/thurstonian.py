"""Thurstonian utilities from pairwise choices.

Each item ``i`` has a mean utility ``μ_i`` and a noise scale ``σ_i > 0``. When the model is offered items ``a``
and ``b`` it picks ``a`` with probability

    P(a ≻ b) = Φ((μ_a − μ_b) / √(σ_a² + σ_b²))

where ``Φ`` is the standard normal CDF. :func:`fit_thurstonian` finds ``μ`` and ``σ`` by maximum likelihood on
*soft* observed choice probabilities ``p`` (for instance the fraction of samples, or the probability mass, on the
first option). The loss is the weighted mean cross-entropy plus two penalties averaged over the ``n`` items,

    L(μ, log σ) = −Σ_k w_k [p_k log P_k + (1 − p_k) log(1 − P_k)] / Σ_k w_k
                  + sigma_reg·(1/n)·Σ_i (log σ_i)² + mu_reg·(1/n)·Σ_i μ_i²

minimised with L-BFGS-B and analytic gradients (derived in :class:`_Objective`). Both parts are per-unit means, so
a given ``sigma_reg`` means the same thing however many pairs and items there are. (As a sum over pairs, the
penalty is ``sigma_reg·(Σw/n)·Σ_i (log σ_i)²``: with 18 comparisons per item the default 1e-2 is 0.18 per item.)
The σ penalty matters: with few or hard (0/1) labels the likelihood alone lets some σ collapse, which makes the
fit over-confident and hurts held-out log-loss. The default suits soft labels; for hard choices or labels from
very few samples, ``sigma_reg`` around 0.1 held out better in our synthetic checks (use :func:`holdout_evaluate`
to choose). The two penalties also fix what the
likelihood cannot: it is unchanged when all ``μ`` and ``σ`` are multiplied by one factor (the ``σ`` penalty picks
the scale) or when a constant is added to all ``μ`` (the tiny ``μ`` penalty picks the offset). After the fit the
utilities are reported on a fixed scale: ``μ`` has mean 0 and standard deviation 1 over the compared items, and
``σ`` is divided by the same factor, so every probability is unchanged.

Items that appear in no pair carry no information; they keep ``μ = 0`` and ``σ = 1`` and are listed in
:attr:`ThurstonianFit.uncompared`.

:func:`fit_thurstonian_adam` is a *reference* fitter (full-batch Adam in torch on the same loss). It exists only
so the benchmark and the tests can check the L-BFGS fitter against a plain, independent implementation; use
:func:`fit_thurstonian` for real work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import minimize
from scipy.sparse import csr_matrix
from scipy.sparse.linalg import lsqr
from scipy.special import erfc, log_ndtr, ndtr, ndtri
from threadpoolctl import threadpool_limits

from personascope.errors import PersonascopeError

__all__ = [
    "ThurstonianFit",
    "fit_thurstonian",
    "fit_thurstonian_adam",
    "holdout_evaluate",
    "log_loss",
    "pair_accuracy",
]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_HALF = math.sqrt(0.5)
_MU_REG = 1e-4

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


@dataclass
class ThurstonianFit:
    """Fitted utilities: ``mu`` (mean 0, std 1 over compared items) and ``sigma`` (> 0), one per item.

    ``nll`` is the weighted negative log-likelihood (cross-entropy summed over pairs, without the penalties) at
    the optimum; ``objective`` is the penalised loss the optimiser minimised (mean cross-entropy plus penalties,
    at the optimiser's own scale, before normalisation; lower is better when comparing fits of the same data);
    ``converged`` and ``n_iter`` come from the optimiser; ``uncompared`` holds the indices of items that appeared
    in no pair (their ``mu`` is 0 and ``sigma`` 1: nothing is known about them).
    """

    mu: FloatArray
    sigma: FloatArray
    nll: float
    converged: bool
    n_iter: int
    uncompared: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    objective: float = math.nan

    @property
    def n_items(self) -> int:
        return int(self.mu.shape[0])

    def prob(self, a_idx: ArrayLike, b_idx: ArrayLike) -> FloatArray:
        """P(a ≻ b) for each (broadcast) pair of item indices."""
        a = np.asarray(a_idx, dtype=np.int64)
        b = np.asarray(b_idx, dtype=np.int64)
        return np.asarray(ndtr(_z(self.mu, self.sigma, a, b)), dtype=np.float64)

    def ranking(self) -> IntArray:
        """Item indices from most to least preferred."""
        return np.argsort(-self.mu, kind="stable").astype(np.int64)


# ----------------------------------------------------------------------------------------------------------- checks


def _validate(
    n_items: int, pairs: ArrayLike, p_first: ArrayLike, weights: ArrayLike | None = None
) -> tuple[IntArray, FloatArray, FloatArray]:
    if isinstance(n_items, bool) or not isinstance(n_items, int | np.integer) or n_items < 2:
        raise PersonascopeError(f"n_items must be an integer ≥ 2, got {n_items!r}; pass the number of items compared")
    arr = np.asarray(pairs)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise PersonascopeError(
            f"pairs must have shape [M, 2] (one row per comparison), got shape {arr.shape}; reshape it to [M, 2]"
        )
    if arr.shape[0] == 0:
        raise PersonascopeError("pairs is empty; pass at least one comparison to fit")
    if not np.issubdtype(arr.dtype, np.integer) and (
        not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))
    ):
        raise PersonascopeError("pairs must hold integer item indices; convert them with pairs.astype(int)")
    idx = arr.astype(np.int64)
    bad = np.flatnonzero((idx < 0).any(axis=1) | (idx >= n_items).any(axis=1))
    if bad.size:
        k = int(bad[0])
        raise PersonascopeError(
            f"pairs row {k} = {idx[k].tolist()} refers to an item outside 0..{n_items - 1} "
            f"({bad.size} such rows); fix the indices or raise n_items"
        )
    selfs = np.flatnonzero(idx[:, 0] == idx[:, 1])
    if selfs.size:
        k = int(selfs[0])
        raise PersonascopeError(
            f"pairs row {k} compares item {int(idx[k, 0])} with itself ({selfs.size} such rows); drop self-pairs"
        )
    p = np.asarray(p_first, dtype=np.float64).reshape(-1) if np.ndim(p_first) <= 1 else None
    if p is None:
        raise PersonascopeError("p_first must be one-dimensional (one probability per pair); flatten it")
    if p.shape[0] != idx.shape[0]:
        raise PersonascopeError(
            f"p_first has {p.shape[0]} values but pairs has {idx.shape[0]} rows; pass one probability per pair"
        )
    badp = np.flatnonzero(~np.isfinite(p) | (p < 0.0) | (p > 1.0))
    if badp.size:
        k = int(badp[0])
        raise PersonascopeError(
            f"p_first[{k}] = {p[k]!r} is not a probability in [0, 1] ({badp.size} such values); clip or fix them"
        )
    if weights is None:
        w = np.ones(idx.shape[0], dtype=np.float64)
    else:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape[0] != idx.shape[0]:
            raise PersonascopeError(
                f"weights has {w.shape[0]} values but pairs has {idx.shape[0]} rows; pass one weight per pair"
            )
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise PersonascopeError("weights must be finite, non-negative and not all zero; fix the weights")
    return idx, p, w


def _check_settings(sigma_reg: float, mu_reg: float) -> None:
    if not (math.isfinite(sigma_reg) and sigma_reg >= 0 and math.isfinite(mu_reg) and mu_reg >= 0):
        raise PersonascopeError(
            f"sigma_reg and mu_reg must be finite and ≥ 0, got {sigma_reg} and {mu_reg}; e.g. sigma_reg=1e-2"
        )


# ------------------------------------------------------------------------------------------------------------ model


def _z(mu: FloatArray, sigma: FloatArray, a: IntArray, b: IntArray) -> FloatArray:
    return np.asarray((mu[a] - mu[b]) / np.sqrt(sigma[a] ** 2 + sigma[b] ** 2), dtype=np.float64)


def _cross_entropy(z: FloatArray, p: FloatArray) -> FloatArray:
    """Per-pair −[p log Φ(z) + (1−p) log Φ(−z)], computed in log space (stable for large |z|)."""
    out = np.zeros_like(z)
    pos = p > 0
    neg = p < 1
    out[pos] -= p[pos] * log_ndtr(z[pos])
    out[neg] -= (1.0 - p[neg]) * log_ndtr(-z[neg])
    return out


class _Objective:
    """Penalised mean cross-entropy and its analytic gradient in ``x = [μ, log σ]``.

    With d = μ_a − μ_b, s² = σ_a² + σ_b², z = d/s and λ(x) = φ(x)/Φ(x) (the inverse Mills ratio),

        ℓ = −w [p log Φ(z) + (1−p) log Φ(−z)]
        ∂ℓ/∂z = −w [p λ(z) − (1−p) λ(−z)]                       =: g
        ∂z/∂μ_a = 1/s,  ∂z/∂μ_b = −1/s
        ∂z/∂log σ_a = −z σ_a²/s²,  ∂z/∂log σ_b = −z σ_b²/s²     (since ∂s/∂log σ_a = σ_a²/s)

    The objective is Σℓ / Σw + sigma_reg·mean_i (log σ_i)² + mu_reg·mean_i μ_i², so the penalties add
    2·sigma_reg·log σ_i / n and 2·mu_reg·μ_i / n to the gradient.

    Numerics: with t = |z| only the lower tail Φ(−t) ≤ 1/2 is computed directly (as erfc, which keeps full relative
    accuracy); Φ(t) = 1 − Φ(−t) then loses nothing, log Φ(t) = log1p(−Φ(−t)), and both Mills ratios are φ(t)
    divided by a quantity that is never tiny relative to φ. Beyond t = 30, where erfc would soon underflow, the
    tail switches to ``scipy.special.log_ndtr``. This is about twice as fast as two ``log_ndtr`` calls.
    """

    _TAIL = 30.0

    def __init__(
        self, n_items: int, pairs: IntArray, p: FloatArray, w: FloatArray, sigma_reg: float, mu_reg: float
    ) -> None:
        m = pairs.shape[0]
        self.n = n_items
        self.a = pairs[:, 0]
        self.b = pairs[:, 1]
        self.wp = w * p
        self.wq = w * (1.0 - p)
        self.scale = 1.0 / float(w.sum())
        # Penalties are means over items, on the same per-unit scale as the mean data loss.
        self.sigma_reg = float(sigma_reg) / n_items
        self.mu_reg = float(mu_reg) / n_items
        cols = np.arange(m)
        ones = np.ones(m)
        # Incidence matrices: scattering per-pair terms onto items is a sparse mat-vec (faster than bincount).
        self.first = csr_matrix((ones, (self.a, cols)), shape=(n_items, m))
        self.second = csr_matrix((ones, (self.b, cols)), shape=(n_items, m))
        self.diff = (self.first - self.second).tocsr()
        self.n_calls = 0

    def __call__(self, x: FloatArray) -> tuple[float, FloatArray]:
        self.n_calls += 1
        n = self.n
        mu, theta = x[:n], x[n:]
        var = np.exp(2.0 * theta)
        va, vb = var[self.a], var[self.b]
        s2 = va + vb
        s = np.sqrt(s2)
        z = (mu[self.a] - mu[self.b]) / s
        pos = z >= 0
        t = np.abs(z)
        tc = np.minimum(t, self._TAIL)
        half_t2 = 0.5 * tc * tc
        tail = 0.5 * erfc(tc * _SQRT_HALF)  # Φ(−t) in [Φ(−30), 1/2]
        phi = np.exp(-half_t2) * _INV_SQRT_2PI
        small = np.log(tail)  # log Φ(−t)
        big = np.log1p(-tail)  # log Φ(t)
        r_small = phi / tail  # φ(t)/Φ(−t)
        r_big = phi / (1.0 - tail)  # φ(t)/Φ(t)
        far = np.flatnonzero(t > self._TAIL)
        if far.size:
            tf = t[far]
            small[far] = log_ndtr(-tf)
            r_small[far] = np.exp(-0.5 * tf * tf - _LOG_SQRT_2PI - small[far])
            big[far] = 0.0
            r_big[far] = 0.0
        w_big = np.where(pos, self.wp, self.wq)
        w_small = np.where(pos, self.wq, self.wp)
        nll = -(w_big @ big + w_small @ small)
        # g = −w[p λ(z) − (1−p) λ(−z)]; for z ≥ 0, λ(z) = r_big and λ(−z) = r_small, and the roles swap for z < 0.
        g = w_small * r_small - w_big * r_big
        g[~pos] *= -1.0
        g *= self.scale
        g_mu = g / s
        g_th = -g * z / s2
        grad = np.empty_like(x)
        grad[:n] = self.diff @ g_mu + 2.0 * self.mu_reg * mu
        grad[n:] = self.first @ (g_th * va) + self.second @ (g_th * vb) + 2.0 * self.sigma_reg * theta
        f = float(nll) * self.scale + self.sigma_reg * float(theta @ theta) + self.mu_reg * float(mu @ mu)
        return f, grad


def _objective(
    x: FloatArray,
    n_items: int,
    pairs: IntArray,
    p: FloatArray,
    w: FloatArray,
    sigma_reg: float = 1e-2,
    mu_reg: float = _MU_REG,
) -> tuple[float, FloatArray]:
    """Penalised loss and gradient at ``x = [μ, log σ]`` (divided by Σw); exposed for gradient checks."""
    return _Objective(n_items, pairs, p, w, sigma_reg, mu_reg)(x)


def _probit_init(n_items: int, pairs: IntArray, p: FloatArray, w: FloatArray) -> FloatArray:
    """Least-squares start (Thurstone's case V): μ_a − μ_b ≈ √2·Φ⁻¹(p), solved on the comparison graph.

    Cheap (a sparse least-squares solve) and usually close to the maximum-likelihood μ, so L-BFGS needs far fewer
    iterations than from zero.
    """
    m = pairs.shape[0]
    target = math.sqrt(2.0) * ndtri(np.clip(p, 0.02, 0.98))
    sw = np.sqrt(w)
    rows = np.repeat(np.arange(m), 2)
    vals = np.stack([sw, -sw], axis=1).reshape(-1)
    design = csr_matrix((vals, (rows, pairs.reshape(-1))), shape=(m, n_items))
    mu = lsqr(design, target * sw, damp=1e-3, atol=1e-6, btol=1e-6, iter_lim=200)[0]
    return np.asarray(mu - mu.mean(), dtype=np.float64)


def _start(
    n_items: int,
    init: ThurstonianFit | tuple[ArrayLike, ArrayLike] | None,
    pairs: IntArray,
    p: FloatArray,
    w: FloatArray,
) -> FloatArray:
    if init is None:
        return np.concatenate([_probit_init(n_items, pairs, p, w), np.zeros(n_items)])
    mu0, sigma0 = (init.mu, init.sigma) if isinstance(init, ThurstonianFit) else init
    mu_arr = np.asarray(mu0, dtype=np.float64).reshape(-1)
    sigma_arr = np.asarray(sigma0, dtype=np.float64).reshape(-1)
    if mu_arr.shape[0] != n_items or sigma_arr.shape[0] != n_items:
        raise PersonascopeError(
            f"init has {mu_arr.shape[0]} μ and {sigma_arr.shape[0]} σ values but n_items is {n_items}; "
            "pass a fit over the same items or init=None"
        )
    if not (np.all(np.isfinite(mu_arr)) and np.all(np.isfinite(sigma_arr)) and np.all(sigma_arr > 0)):
        raise PersonascopeError("init must have finite μ and finite σ > 0; pass a valid fit or init=None")
    return np.concatenate([mu_arr, np.log(sigma_arr)])


def _finish(
    mu: FloatArray,
    sigma: FloatArray,
    pairs: IntArray,
    p: FloatArray,
    w: FloatArray,
    converged: bool,
    n_iter: int,
    objective: float,
) -> ThurstonianFit:
    """Normalise μ to mean 0 / std 1 over compared items (σ scaled alike); reset uncompared items."""
    n = mu.shape[0]
    seen = np.zeros(n, dtype=bool)
    seen[pairs.reshape(-1)] = True
    mu = mu.copy()
    sigma = sigma.copy()
    mu -= mu[seen].mean()
    std = float(mu[seen].std())
    if std > 1e-12:
        mu /= std
        sigma /= std
    mu[~seen] = 0.0
    sigma[~seen] = 1.0
    nll = float(w @ _cross_entropy(_z(mu, sigma, pairs[:, 0], pairs[:, 1]), p))
    return ThurstonianFit(
        mu=mu,
        sigma=sigma,
        nll=nll,
        converged=bool(converged),
        n_iter=int(n_iter),
        uncompared=np.flatnonzero(~seen).astype(np.int64),
        objective=float(objective),
    )


# ------------------------------------------------------------------------------------------------------------- fits


def fit_thurstonian(
    n_items: int,
    pairs: ArrayLike,
    p_first: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    sigma_reg: float = 1e-2,
    mu_reg: float = _MU_REG,
    init: ThurstonianFit | tuple[ArrayLike, ArrayLike] | None = None,
    max_iter: int = 2000,
    tol: float = 1e-9,
) -> ThurstonianFit:
    """Fit Thurstonian utilities by maximum likelihood on soft pairwise choices (L-BFGS-B, analytic gradients).

    Args:
        n_items: number of items; indices in ``pairs`` run over ``0..n_items-1``.
        pairs: ``[M, 2]`` integer array; row ``k`` offers item ``pairs[k, 0]`` first and ``pairs[k, 1]`` second.
        p_first: ``[M]`` probabilities in ``[0, 1]`` that the first item was chosen (hard 0/1 choices work too).
        weights: optional ``[M]`` non-negative weights per pair (e.g. number of samples behind ``p_first``).
        sigma_reg: L2 penalty on ``log σ``, averaged over items (fixes the overall scale and keeps σ from
            collapsing; raise it, e.g. to 0.1, for hard 0/1 choices).
        mu_reg: weak L2 penalty on ``μ``, averaged over items (fixes the offset; keeps μ finite for items that
            always win or lose).
        init: warm start, a previous :class:`ThurstonianFit` over the same items or a ``(mu, sigma)`` tuple;
            ``None`` starts from a least-squares probit solution with σ = 1.
        max_iter: L-BFGS iteration limit.
        tol: relative tolerance on the objective (``ftol``); the gradient tolerance is ``tol`` as well.

    Returns:
        a :class:`ThurstonianFit` with μ normalised to mean 0 and std 1 over compared items.

    Raises:
        PersonascopeError: on malformed pairs, probabilities, weights or init.
    """
    idx, p, w = _validate(n_items, pairs, p_first, weights)
    _check_settings(sigma_reg, mu_reg)
    if max_iter < 1 or not tol > 0:
        raise PersonascopeError(f"max_iter must be ≥ 1 and tol > 0, got {max_iter} and {tol}; e.g. tol=1e-9")
    n = int(n_items)
    objective = _Objective(n, idx, p, w, sigma_reg, mu_reg)
    x0 = _start(n, init, idx, p, w)
    # L-BFGS-B's BLAS calls are tiny; a multi-threaded BLAS only adds overhead (10x slower on a busy machine).
    with threadpool_limits(limits=1, user_api="blas"):
        res = minimize(
            objective,
            x0,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": int(max_iter), "ftol": float(tol), "gtol": float(tol), "maxcor": 10},
        )
    x = np.asarray(res.x, dtype=np.float64)
    return _finish(x[:n], np.exp(x[n:]), idx, p, w, bool(res.success), int(res.nit), objective(x)[0])


def fit_thurstonian_adam(
    n_items: int,
    pairs: ArrayLike,
    p_first: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    sigma_reg: float = 1e-2,
    mu_reg: float = _MU_REG,
    epochs: int = 1000,
    lr: float = 0.1,
) -> ThurstonianFit:
    """REFERENCE fitter: full-batch Adam in torch on exactly the loss of :func:`fit_thurstonian`.

    Starts from μ = 0, σ = 1, uses autograd (no hand-derived gradient) and runs ``epochs`` full-batch steps. It is
    here to validate and benchmark :func:`fit_thurstonian` against an independent implementation; it is slower and
    its ``converged`` flag only says that the last step changed the loss by less than 1e-9 (relative).
    """
    import torch

    idx, p, w = _validate(n_items, pairs, p_first, weights)
    _check_settings(sigma_reg, mu_reg)
    n = int(n_items)
    a = torch.from_numpy(idx[:, 0])
    b = torch.from_numpy(idx[:, 1])
    wp = torch.from_numpy(w * p)
    wq = torch.from_numpy(w * (1.0 - p))
    scale = 1.0 / float(w.sum())
    mu = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    theta = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([mu, theta], lr=lr)
    prev = math.inf
    loss_value = math.inf
    for _ in range(int(epochs)):
        opt.zero_grad(set_to_none=True)
        var = torch.exp(2.0 * theta)
        z = (mu[a] - mu[b]) / torch.sqrt(var[a] + var[b])
        nll = -(wp @ torch.special.log_ndtr(z) + wq @ torch.special.log_ndtr(-z))
        loss = nll * scale + (sigma_reg * (theta @ theta) + mu_reg * (mu @ mu)) / n
        loss.backward()
        opt.step()
        prev, loss_value = loss_value, float(loss.detach())
    converged = abs(prev - loss_value) <= 1e-9 * max(1.0, abs(loss_value))
    mu_np = mu.detach().numpy().astype(np.float64)
    theta_np = theta.detach().numpy().astype(np.float64)
    final = _Objective(n, idx, p, w, sigma_reg, mu_reg)(np.concatenate([mu_np, theta_np]))[0]
    return _finish(mu_np, np.exp(theta_np), idx, p, w, converged, int(epochs), final)


# ---------------------------------------------------------------------------------------------------------- metrics


def pair_accuracy(fit: ThurstonianFit, pairs: ArrayLike, p_first: ArrayLike) -> float:
    """Fraction of pairs where the fit and the data agree on which item is preferred.

    A pair counts as correct when ``sign(P_fit − 0.5) == sign(p − 0.5)``. Pairs with an observed tie
    (``p == 0.5``) are left out; ``nan`` when every pair is a tie.
    """
    idx, p, _ = _validate(fit.n_items, pairs, p_first)
    keep = p != 0.5
    if not keep.any():
        return math.nan
    pred = fit.prob(idx[keep, 0], idx[keep, 1])
    return float(np.mean(np.sign(pred - 0.5) == np.sign(p[keep] - 0.5)))


def log_loss(fit: ThurstonianFit, pairs: ArrayLike, p_first: ArrayLike) -> float:
    """Mean cross-entropy (nats per pair) of the fit's probabilities against the observed soft choices."""
    idx, p, _ = _validate(fit.n_items, pairs, p_first)
    return float(np.mean(_cross_entropy(_z(fit.mu, fit.sigma, idx[:, 0], idx[:, 1]), p)))


def _entropy(p: FloatArray) -> float:
    q = np.clip(p, 1e-300, 1.0)
    r = np.clip(1.0 - p, 1e-300, 1.0)
    return float(np.mean(-(p * np.log(q) + (1.0 - p) * np.log(r))))


def holdout_evaluate(
    n_items: int,
    pairs: ArrayLike,
    p_first: ArrayLike,
    frac: float = 0.05,
    seed: int = 0,
    **fit_kwargs: Any,
) -> dict[str, float]:
    """Fit on a random ``1 − frac`` of the pairs and score the held-out rest.

    Returns a dict with ``n_train``, ``n_test``, ``train_accuracy``, ``train_log_loss``, ``test_accuracy``,
    ``test_log_loss`` and two ceilings, i.e. the best any model could score on the held-out pairs:

    * ``ceiling_log_loss`` — the entropy of the observed soft labels, the cross-entropy of the labels against
      themselves. No predictor can have a lower log-loss, so ``test_log_loss − ceiling_log_loss`` (≥ 0) is the
      part of the loss a better model could still remove. With hard 0/1 labels it is 0.
    * ``ceiling_accuracy`` — the accuracy of predicting each held-out pair with its own observed ``p``. Because
      :func:`pair_accuracy` leaves ties (``p == 0.5``) out, this is 1.0 whenever at least one held-out pair is
      not a tie (``nan`` otherwise); ``test_tie_fraction`` reports how many held-out pairs were left out that way.

    Extra keyword arguments go to :func:`fit_thurstonian`.
    """
    idx, p, w = _validate(n_items, pairs, p_first, fit_kwargs.pop("weights", None))
    if not 0.0 < frac < 1.0:
        raise PersonascopeError(f"frac must be between 0 and 1 (exclusive), got {frac}; e.g. frac=0.05")
    m = idx.shape[0]
    n_test = max(1, round(frac * m))
    if n_test >= m:
        raise PersonascopeError(f"only {m} pairs: too few to hold out {frac:.0%}; collect more pairs")
    perm = np.random.default_rng(seed).permutation(m)
    test, train = perm[:n_test], perm[n_test:]
    fit = fit_thurstonian(n_items, idx[train], p[train], weights=w[train], **fit_kwargs)
    ties = p[test] == 0.5
    return {
        "n_train": float(train.size),
        "n_test": float(test.size),
        "train_accuracy": pair_accuracy(fit, idx[train], p[train]),
        "train_log_loss": log_loss(fit, idx[train], p[train]),
        "test_accuracy": pair_accuracy(fit, idx[test], p[test]),
        "test_log_loss": log_loss(fit, idx[test], p[test]),
        "ceiling_accuracy": 1.0 if not ties.all() else math.nan,
        "ceiling_log_loss": _entropy(p[test]),
        "test_tie_fraction": float(ties.mean()),
    }
