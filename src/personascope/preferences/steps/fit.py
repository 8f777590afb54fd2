"""The ``fit`` step: Thurstonian utilities per persona from the run's choices (``utilities-P.csv``), scored on
held-out pairs (``fit.json`` / ``fit.md``); :func:`load_utilities` reads them back for the later steps."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from personascope.errors import PersonascopeError
from personascope.io import atomic_open, read_jsonl
from personascope.preferences.steps.run import PrefsRun, fmt, open_run
from personascope.preferences.tasks import Task
from personascope.preferences.thurstonian import ThurstonianFit, fit_thurstonian, holdout_evaluate

__all__ = ["FitResult", "load_utilities", "run_fit"]


@dataclass
class FitResult:
    run_dir: Path
    metrics: dict[str, dict[str, Any]]  # persona → hold-out metrics and fit facts
    utilities: dict[str, np.ndarray]


def _pair_records(prefs: PrefsRun, pairs_file: str | Path | None) -> list[dict[str, Any]]:
    """Pair records from the run (or an external JSONL file), checked against the run's tasks and personas."""
    ids = {t.id for t in prefs.tasks}
    if pairs_file is None:
        rows = [(i + 1, r) for i, r in enumerate(prefs.run.records("pairs"))]
        where = str(prefs.run.file("pairs.jsonl"))
    else:
        rows = read_jsonl(pairs_file)
        where = str(pairs_file)
    out = []
    for line, r in rows:
        if not isinstance(r, dict) or not {"persona", "a", "b", "p"} <= set(r):
            raise PersonascopeError(f'{where}:{line}: a pair record needs "persona", "a", "b" and "p"')
        for side in ("a", "b"):
            if r[side] not in ids:
                raise PersonascopeError(f"{where}:{line}: task id {r[side]!r} is not one of the run's tasks")
        if r["a"] == r["b"]:
            raise PersonascopeError(f"{where}:{line}: a pair compares task {r['a']!r} with itself")
        p = r["p"]
        if isinstance(p, bool) or not isinstance(p, int | float) or not (0.0 <= float(p) <= 1.0):
            raise PersonascopeError(f"{where}:{line}: p = {p!r} is not a probability in [0, 1]")
        out.append(r)
    return out


def run_fit(
    path: str | Path,
    *,
    sigma_reg: float = 1e-2,
    holdout: float = 0.05,
    pairs_file: str | Path | None = None,
    seed: int = 0,
) -> FitResult:
    """Fit Thurstonian utilities for every persona of the run and score them on held-out pairs."""
    prefs = open_run(path)
    records = _pair_records(prefs, pairs_file)
    index = {t.id: i for i, t in enumerate(prefs.tasks)}
    n = len(prefs.tasks)
    metrics: dict[str, dict[str, Any]] = {}
    utilities: dict[str, np.ndarray] = {}
    for persona in prefs.personas:
        mine = [r for r in records if r["persona"] == persona.name]
        if not mine:
            raise PersonascopeError(
                f"no choices for persona {persona.name!r} in {prefs.path}; run `personascope prefs elicit` first"
            )
        pairs = np.array([[index[r["a"]], index[r["b"]]] for r in mine], dtype=np.int64)
        p = np.array([float(r["p"]) for r in mine], dtype=np.float64)
        fit = fit_thurstonian(n, pairs, p, sigma_reg=sigma_reg)
        held = holdout_evaluate(n, pairs, p, frac=holdout, seed=seed, sigma_reg=sigma_reg) if len(mine) >= 4 else {}
        counts = np.bincount(pairs.reshape(-1), minlength=n)
        _write_utilities(prefs.run.file(f"utilities-{persona.name}.csv"), prefs.tasks, fit, counts)
        utilities[persona.name] = fit.mu
        metrics[persona.name] = {
            "n_pairs": len(mine),
            "n_tasks": n,
            "uncompared": int(fit.uncompared.size),
            "converged": fit.converged,
            "nll_per_pair": fit.nll / len(mine),
            **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in held.items()},
        }
    with atomic_open(prefs.run.file("fit.json")) as fh:
        json.dump({"sigma_reg": sigma_reg, "holdout": holdout, "personas": metrics}, fh, indent=2)
    with atomic_open(prefs.run.file("fit.md")) as fh:
        fh.write(_fit_table(metrics) + "\n")
    prefs.run.step("fit", "done", sigma_reg=sigma_reg, holdout=holdout, pairs_file=str(pairs_file or ""))
    return FitResult(prefs.path, metrics, utilities)


def _write_utilities(path: Path, tasks: list[Task], fit: ThurstonianFit, counts: np.ndarray) -> None:
    with atomic_open(path) as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "topic", "split", "mu", "sigma", "n_comparisons"])
        for t, mu, sd, c in zip(tasks, fit.mu, fit.sigma, counts, strict=True):
            writer.writerow([t.id, t.topic, t.split, f"{mu:.6f}", f"{sd:.6f}", int(c)])


def _fit_table(metrics: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| persona | pairs | held-out acc | held-out log-loss | ceiling log-loss | train acc |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in metrics.items():
        lines.append(
            f"| {name} | {m['n_pairs']} | {fmt(m.get('test_accuracy'))} | {fmt(m.get('test_log_loss'))} | "
            f"{fmt(m.get('ceiling_log_loss'))} | {fmt(m.get('train_accuracy'))} |"
        )
    return "\n".join(lines)


def load_utilities(prefs: PrefsRun, persona: str) -> np.ndarray:
    """The fitted utilities of ``persona`` in task order (from ``utilities-P.csv``)."""
    path = prefs.run.file(f"utilities-{persona}.csv")
    if not path.is_file():
        raise PersonascopeError(
            f"no utilities for persona {persona!r} in {prefs.path}; run `personascope prefs fit` first"
        )
    with path.open(encoding="utf-8") as fh:
        rows = {r["id"]: float(r["mu"]) for r in csv.DictReader(fh)}
    missing = [t.id for t in prefs.tasks if t.id not in rows]
    if missing:
        raise PersonascopeError(f"{path} lacks task {missing[0]!r}; run `personascope prefs fit` again")
    return np.array([rows[t.id] for t in prefs.tasks], dtype=np.float64)
