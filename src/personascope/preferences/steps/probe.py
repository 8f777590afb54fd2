"""The ``probe`` step: ridge probes on every layer for one persona's utilities, with the baselines.

Writes ``probe-P.{csv,md,json,png}`` and the probe directions as a PersonaVector ``probe-P.safetensors``; the task
activations (``activations-P.safetensors``) and embeddings are the run's cached tensors
(:mod:`~personascope.preferences.steps.run`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from personascope.io import atomic_open
from personascope.preferences.personas import Persona
from personascope.preferences.probes import DEFAULT_ALPHAS, FeatureScore, ProbeReport, evaluate_probes
from personascope.preferences.steps.fit import load_utilities
from personascope.preferences.steps.run import (
    EmbedFn,
    PrefsRun,
    fmt,
    json_safe,
    open_run,
    task_activations,
    task_embeddings,
)

if TYPE_CHECKING:
    from personascope.models.loading import Model

__all__ = ["ProbeRunResult", "probe_table", "run_probe"]


@dataclass
class ProbeRunResult:
    run_dir: Path
    persona: str
    report: ProbeReport
    files: dict[str, Path]


def run_probe(
    path: str | Path,
    *,
    persona: str | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    embed: bool = True,
    embed_fn: EmbedFn | None = None,
    model: Model | None = None,
    device: str | None = None,
    batch_size: int = 16,
    n_pairs: int = 2000,
    loto: bool = True,
    n_shuffles: int = 10,
    seed: int = 0,
) -> ProbeRunResult:
    """Train and score ridge probes on every layer for one persona's utilities, with the baselines."""
    prefs = open_run(path)
    who = prefs.persona(persona)
    y = load_utilities(prefs, who.name)
    m = prefs.load_model(model, device)
    feats = task_activations(prefs, m, who, batch_size).numpy()
    baselines = {"embedding": task_embeddings(prefs, embed_fn)} if embed else {}
    report = evaluate_probes(
        feats,
        y,
        [t.split for t in prefs.tasks],
        [t.topic for t in prefs.tasks],
        baselines=baselines,
        alphas=alphas,
        n_pairs=n_pairs,
        seed=seed,
        loto=loto,
        n_shuffles=n_shuffles,
    )
    files = _write_probe(prefs, who, m, report, alphas)
    prefs.run.step(f"probe:{who.name}", "done", best_layer=report.best_layer, test_r=json_safe(report.best.test_r))
    return ProbeRunResult(prefs.path, who.name, report, files)


def _write_probe(
    prefs: PrefsRun, who: Persona, model: Model, report: ProbeReport, alphas: Sequence[float]
) -> dict[str, Path]:
    """The table (csv, md), the summary (json), the plot and the unit probe directions as a PersonaVector."""
    from personascope.report.prefs_plots import plot_probe_layers
    from personascope.vectors import PersonaVector

    stem = f"probe-{who.name}"
    files = {ext: prefs.run.file(f"{stem}.{ext}") for ext in ("csv", "md", "json", "png")}
    files["vector"] = prefs.run.file(f"{stem}.safetensors")
    rows = report.rows()
    with atomic_open(files["csv"]) as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with atomic_open(files["md"]) as fh:
        fh.write(probe_table(report) + "\n")
    summary = {
        "persona": who.name,
        "best_layer": report.best_layer,
        "best": report.best.as_row(),
        "shuffled_at_best": next(s.as_row() for s in report.shuffled if s.layer == report.best_layer),
        "baselines": {k: v.as_row() for k, v in report.baselines.items()},
        "alphas": list(alphas),
        "n_tasks": len(prefs.tasks),
    }
    with atomic_open(files["json"]) as fh:
        json.dump(json_safe(summary), fh, indent=2)
    plot_probe_layers(report, files["png"], title=f"utility probes ({who.name}, {model.name})")
    unit = torch.from_numpy(report.directions).float()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    PersonaVector.for_model(
        model,
        unit,
        trait="preference",
        method="ridge_probe",
        persona=who.name,
        chosen_layer=report.best_layer,
        source_run=str(prefs.path),
        test_r=[s.test_r for s in report.layers],
    ).save(files["vector"])
    return files


def _score_cells(s: FeatureScore) -> str:
    return (
        f"{fmt(s.test_r)} [{fmt(s.test_r_low)}, {fmt(s.test_r_high)}] | {fmt(s.test_pair_acc)} | "
        f"{fmt(s.loto_r)} | {fmt(s.loto_within_r)} | {s.alpha:g} | {fmt(s.val_r)}"
    )


def probe_table(report: ProbeReport) -> str:
    """Markdown: one row per layer (best marked) and per baseline."""
    lines = [
        "| features | test r [95% CI] | test pair acc | leave-topic-out r (pooled) | leave-topic-out r (within) "
        "| α | val r | shuffled r [null 95%] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    shuffled = {s.layer: s for s in report.shuffled}
    for s in report.layers:
        mark = " (best)" if s.layer == report.best_layer else ""
        sh = shuffled.get(s.layer)
        null = f"{fmt(sh.test_r)} [{fmt(sh.test_r_low)}, {fmt(sh.test_r_high)}]" if sh else "—"
        lines.append(f"| layer {s.layer}{mark} | {_score_cells(s)} | {null} |")
    for name, s in report.baselines.items():
        lines.append(f"| {name} baseline | {_score_cells(s)} | — |")
    return "\n".join(lines)
