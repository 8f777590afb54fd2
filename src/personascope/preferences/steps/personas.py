"""The ``personas`` step: compare the run's personas (``persona-matrix.{csv,md,json,png}``).

For every (source, target) pair of personas: the correlation of their utilities over all tasks, the source's test
utilities as a prediction of the target's (the baseline), and the source's probe (at its best validation layer)
applied to the target's activations on the test tasks.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from personascope.errors import PersonascopeError
from personascope.io import atomic_open
from personascope.preferences.probes import DEFAULT_ALPHAS, select_ridge
from personascope.preferences.steps.fit import load_utilities
from personascope.preferences.steps.run import PrefsRun, fmt, json_safe, open_run, task_activations

if TYPE_CHECKING:
    from personascope.models.loading import Model

__all__ = ["PersonasResult", "personas_table", "run_personas"]


@dataclass
class PersonasResult:
    run_dir: Path
    names: list[str]
    utility_r: np.ndarray  # [P, P] over all tasks
    baseline_r: np.ndarray  # [P, P] on test tasks: persona i's utilities as the prediction of j's
    probe_r: np.ndarray  # [P, P] on test tasks: probe trained under i, applied to j's activations, vs j's utilities
    layers: dict[str, int]  # each source persona's probe layer (best validation r)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3 or np.ptp(a) < 1e-12 or np.ptp(b) < 1e-12:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def _split_masks(prefs: PrefsRun) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    split = np.array([t.split for t in prefs.tasks])
    tr, va, te = split == "train", split == "val", split == "test"
    for name, mask in (("train", tr), ("val", va), ("test", te)):
        if mask.sum() < 3:
            raise PersonascopeError(f"the {name} split has {int(mask.sum())} tasks; use more tasks (at least 3 each)")
    return tr, va, te


def _best_probe(
    x: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray, layer: int | None, alphas: Sequence[float]
) -> tuple[int, Any]:
    """The layer (``layer``, or the best by validation r, the first on ties) and its ridge probe."""
    candidates = [layer] if layer is not None else list(range(x.shape[1]))
    best: tuple[float, int, Any] | None = None
    for cand in candidates:
        probe, val_r = select_ridge(x[tr, cand], y[tr], x[va, cand], y[va], alphas)
        score = -math.inf if math.isnan(val_r) else val_r
        if best is None or score > best[0]:
            best = (score, cand, probe)
    assert best is not None
    return best[1], best[2]


def run_personas(
    path: str | Path,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    layer: int | None = None,
    model: Model | None = None,
    device: str | None = None,
    batch_size: int = 16,
) -> PersonasResult:
    """Compare the run's personas: utility correlations and how probes transfer across personas."""
    from personascope.report.prefs_plots import plot_persona_matrices

    prefs = open_run(path)
    if len(prefs.personas) < 2:
        raise PersonascopeError(
            "comparing personas needs a run with at least two (prefs elicit --persona A --persona B)"
        )
    names = [p.name for p in prefs.personas]
    utils = {n: load_utilities(prefs, n) for n in names}
    m = prefs.load_model(model, device)
    if layer is not None:
        m.check_layer(layer)
    feats = {p.name: task_activations(prefs, m, p, batch_size).numpy().astype(np.float64) for p in prefs.personas}
    tr, va, te = _split_masks(prefs)
    k = len(names)
    utility_r, baseline_r, probe_r = (np.full((k, k), np.nan) for _ in range(3))
    layers: dict[str, int] = {}
    for i, src in enumerate(names):
        chosen, probe = _best_probe(feats[src], utils[src], tr, va, layer, alphas)
        layers[src] = int(chosen)
        for j, dst in enumerate(names):
            utility_r[i, j] = _corr(utils[src], utils[dst])
            baseline_r[i, j] = _corr(utils[src][te], utils[dst][te])
            probe_r[i, j] = _corr(probe.predict(feats[dst][te, chosen]), utils[dst][te])
    result = PersonasResult(prefs.path, names, utility_r, baseline_r, probe_r, layers)
    _write_personas(prefs, result)
    plot_persona_matrices(
        names,
        {
            "utility correlation (all tasks)": utility_r,
            "probe trained on row, tested on column": probe_r,
            "row utilities predicting column (test)": baseline_r,
        },
        prefs.run.file("persona-matrix.png"),
        title=f"personas ({m.name}, {len(prefs.tasks)} tasks)",
    )
    prefs.run.step("personas", "done", layers=layers)
    return result


def _write_personas(prefs: PrefsRun, res: PersonasResult) -> None:
    with atomic_open(prefs.run.file("persona-matrix.csv")) as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "target", "utility_r", "baseline_r", "probe_r", "probe_layer"])
        for i, src in enumerate(res.names):
            for j, dst in enumerate(res.names):
                cells = [res.utility_r[i, j], res.baseline_r[i, j], res.probe_r[i, j]]
                writer.writerow([src, dst, *(fmt(float(c), 4) for c in cells), res.layers[src]])
    data = {
        "personas": res.names,
        "utility_r": res.utility_r.tolist(),
        "baseline_r": res.baseline_r.tolist(),
        "probe_r": res.probe_r.tolist(),
        "probe_layers": res.layers,
    }
    with atomic_open(prefs.run.file("persona-matrix.json")) as fh:
        json.dump(json_safe(data), fh, indent=2)
    with atomic_open(prefs.run.file("persona-matrix.md")) as fh:
        fh.write(personas_table(res) + "\n")


def personas_table(res: PersonasResult) -> str:
    """Markdown: for every (source, target) the utility correlation, the baseline and the probe's transfer r."""
    lines = [
        "| probe from → on | utility r (all) | baseline r (test) | probe r (test) |",
        "|---|---|---|---|",
    ]
    for i, src in enumerate(res.names):
        for j, dst in enumerate(res.names):
            lines.append(
                f"| {src} (layer {res.layers[src]}) → {dst} | {fmt(res.utility_r[i, j])} | "
                f"{fmt(res.baseline_r[i, j])} | {fmt(res.probe_r[i, j])} |"
            )
    return "\n".join(lines)
