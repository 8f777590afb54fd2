"""Thurstonian fit speed and quality: L-BFGS with analytic gradients against the full-batch Adam reference.

Synthetic data with known utilities: 500 items with μ ~ N(0, 1) and σ = 0.5·exp(N(0, 0.3²)), 9,000 distinct random
pairs, soft choice probabilities from the true model plus N(0, noise²) noise (clipped to [0, 1]). Both fitters
minimise the same penalised loss with their defaults. Printed, from one run:

* wall time of ``fit_thurstonian`` (best of ``--repeats``) and of ``fit_thurstonian_adam(epochs=1000)`` (torch on
  ``--adam-threads`` threads, default 1: the fastest for this size on a small shared machine), and the ratio;
* the data log-loss and the penalised objective each reaches; recovery of μ (Pearson r) and σ (Spearman ρ)
  against the truth;
* Adam at 100/300/1000/3000 epochs: time, log-loss and objective gaps to L-BFGS, and agreement of μ;
* the goal — L-BFGS ≤ 2 s and ≥ 20× faster than Adam at the same log-loss (within 1%) — met or missed.

Run: ``.venv/bin/python benchmarks/bench_thurstonian.py [--items 500] [--pairs 9000] [--noise 0.03]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import ndtr
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_of

from personascope.preferences.thurstonian import ThurstonianFit, fit_thurstonian, fit_thurstonian_adam, log_loss


def synthetic(
    n_items: int, n_pairs: int, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=n_items)
    sigma = 0.5 * np.exp(rng.normal(scale=0.3, size=n_items))
    i, j = np.triu_indices(n_items, k=1)
    pick = rng.choice(i.size, size=n_pairs, replace=False)
    pairs = np.stack([i[pick], j[pick]], axis=1)
    flip = rng.random(n_pairs) < 0.5
    pairs[flip] = pairs[flip][:, ::-1]
    a, b = pairs[:, 0], pairs[:, 1]
    p_true = ndtr((mu[a] - mu[b]) / np.sqrt(sigma[a] ** 2 + sigma[b] ** 2))
    p = np.clip(p_true + rng.normal(scale=noise, size=n_pairs), 0.0, 1.0)
    return mu, sigma, pairs.astype(np.int64), p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--pairs", type=int, default=9000)
    parser.add_argument("--noise", type=float, default=0.03)
    parser.add_argument("--repeats", type=int, default=5, help="L-BFGS timing: best of this many runs")
    parser.add_argument("--adam-threads", type=int, default=1, help="torch threads for the Adam reference")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.adam_threads)

    mu, sigma, pairs, p = synthetic(args.items, args.pairs, args.noise, args.seed)
    n = args.items
    print(f"synthetic: {n} items, {pairs.shape[0]} pairs, noise sd {args.noise}; torch threads {args.adam_threads}")

    fit = fit_thurstonian(n, pairs, p)
    fit_thurstonian_adam(n, pairs, p, epochs=5)  # warm-up: first torch calls pay one-off set-up costs
    t_lbfgs = best_of(lambda: fit_thurstonian(n, pairs, p), args.repeats)
    start = time.perf_counter()
    adam = fit_thurstonian_adam(n, pairs, p, epochs=1000)
    t_adam = time.perf_counter() - start

    truth = ThurstonianFit(mu=mu, sigma=sigma, nll=np.nan, converged=True, n_iter=0)
    ll_lbfgs = log_loss(fit, pairs, p)
    ll_adam = log_loss(adam, pairs, p)
    gap = (ll_adam - ll_lbfgs) / ll_lbfgs
    ratio = t_adam / t_lbfgs

    def r_mu(f: ThurstonianFit, ref: np.ndarray = mu) -> float:
        return float(np.corrcoef(f.mu, ref)[0, 1])

    def rho_sigma(f: ThurstonianFit) -> float:
        return float(spearmanr(f.sigma, sigma).statistic)

    print(
        f"L-BFGS  fit_thurstonian        {t_lbfgs * 1e3:8.1f} ms  ({fit.n_iter} iterations, converged {fit.converged})"
    )
    print(f"Adam    fit_thurstonian_adam   {t_adam * 1e3:8.1f} ms  (1000 epochs)")
    print(f"speed ratio Adam / L-BFGS      {ratio:8.1f}x")
    print(
        f"log-loss   L-BFGS {ll_lbfgs:.5f}   Adam {ll_adam:.5f}   (Adam − L-BFGS {gap:+.3%})   "
        f"true model {log_loss(truth, pairs, p):.5f}"
    )
    print(f"penalised objective (what both minimise)   L-BFGS {fit.objective:.6f}   Adam {adam.objective:.6f}")
    print(
        f"recovery vs truth   μ Pearson r: L-BFGS {r_mu(fit):.4f}, Adam {r_mu(adam):.4f}   "
        f"σ Spearman ρ: L-BFGS {rho_sigma(fit):.3f}, Adam {rho_sigma(adam):.3f}"
    )

    print("Adam by epochs (gaps relative to L-BFGS; r = Pearson of μ with the L-BFGS μ):")
    within = None
    for epochs in (100, 300, 1000, 3000):
        if epochs == 1000:
            f, t = adam, t_adam
        else:
            start = time.perf_counter()
            f = fit_thurstonian_adam(n, pairs, p, epochs=epochs)
            t = time.perf_counter() - start
        g = (log_loss(f, pairs, p) - ll_lbfgs) / ll_lbfgs
        if within is None and abs(g) <= 0.01:
            within = (epochs, t)
        print(
            f"  {epochs:5d} epochs {t * 1e3:8.0f} ms   log-loss {g:+.3%}   "
            f"objective {(f.objective - fit.objective) / fit.objective:+.3%}   r {r_mu(f, fit.mu):.4f}"
        )

    fast = t_lbfgs <= 2.0
    same = abs(gap) <= 0.01
    faster = ratio >= 20.0
    verdict = "MET" if fast and same and faster else "MISSED"
    print(
        f"GOAL (L-BFGS ≤ 2 s and ≥ 20x faster than Adam(1000 epochs) at the same log-loss within 1%): {verdict} "
        f"[time {'ok' if fast else 'too slow'}; log-loss {'same' if same else 'differs'}; "
        f"ratio {ratio:.1f}x{'' if faster else ' < 20x'}]"
    )
    if within is not None and within[0] < 1000:
        print(
            f"NOTE: Adam's data log-loss is already within 1% after {within[0]} epochs ({within[1] * 1e3:.0f} ms, "
            f"{within[1] / t_lbfgs:.1f}x the L-BFGS time), although its penalised objective and its μ are not yet "
            "at the optimum there; against that stopping rule the speed-up is smaller."
        )


if __name__ == "__main__":
    main()
