"""The drift experiment's summary and outputs: Pearson r with bootstrap intervals, tables, files and plots."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from personascope.finetune.drift import DriftConfig
    from personascope.runs import RunDir


def _is_final(point: dict[str, Any]) -> bool:
    """Whether a point measures a finished finetune (not a checkpoint on the way)."""
    return "@" not in str(point["model"])  # checkpoints are labelled NAME@STEP


def _r(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    from personascope.report.stats import pearson_ci

    pairs = [(a, b) for a, b in zip(x, y, strict=True) if a is not None and b is not None and not math.isnan(a + b)]
    r, lo, hi = pearson_ci([a for a, _ in pairs], [b for _, b in pairs])
    return {"r": _num(r), "ci": [_num(lo), _num(hi)], "n": len(pairs)}


def _num(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _summarise(points: list[dict[str, Any]], traits: list[str], cfg: DriftConfig) -> dict[str, Any]:
    final = [p for p in points if _is_final(p)]
    out: dict[str, Any] = {"by_trait": {}}
    for t in traits:
        rows = [p for p in final if p["trait"] == t]
        shift = [p["shift"] for p in rows]
        change = [p["trait_change"] for p in rows]
        pdiff = [p["projection_difference"] for p in rows]
        entry = {
            "layer": rows[0]["layer"] if rows else None,
            "shift_vs_trait_change": _r(shift, change),
            "projection_difference_vs_trait_change": _r(pdiff, change),
            "projection_difference_vs_shift": _r(pdiff, shift),
        }
        if cfg.track is not None:
            tracked = sorted(
                (p for p in points if p["dataset"] == cfg.track and p["trait"] == t), key=lambda p: p["step"]
            )
            entry["checkpoints"] = {
                "dataset": cfg.track,
                "steps": [p["step"] for p in tracked],
                "shift_vs_trait_change": _r([p["shift"] for p in tracked], [p["trait_change"] for p in tracked]),
            }
        out["by_trait"][t] = entry
    return out


def format_points(points: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the finetuned models' shift, projection difference and trait change."""

    def f(value: Any, spec: str) -> str:
        return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    lines = [
        "| model | trait (layer) | shift | projection difference | trait score ± 95% CI | trait change | coherence |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p['model']} | {p['trait']} ({p['layer']}) | {f(p['shift'], '+.2f')} | "
            f"{f(p.get('projection_difference'), '+.2f')} | {f(p['trait_score'], '.1f')} ± {f(p['trait_ci'], '.1f')} | "
            f"{f(p['trait_change'], '+.1f')} | {f(p['coherence'], '.1f')} |"
        )
    return "\n".join(lines)


def format_compare(rows: Sequence[dict[str, Any]]) -> str:
    def f(value: Any, ci: Any) -> str:
        if value is None or math.isnan(value):
            return "n/a"
        return f"{value:.1f}" + ("" if ci is None or math.isnan(ci) else f" ± {ci:.1f}")

    lines = ["| method | trait | coherence | n | MCQ accuracy |", "|---|---|---|---|---|"]
    for r in rows:
        acc = "—" if r["mcq_accuracy"] is None else f"{r['mcq_accuracy']:.3f}"
        lines.append(
            f"| {r['method']} | {f(r['trait'], r['trait_ci'])} | {f(r['coherence'], r['coherence_ci'])} | {r['n']} | "
            f"{acc} |"
        )
    return "\n".join(lines)


def _r_text(summary: dict[str, Any], trait: str, name: str) -> str:
    r = summary["by_trait"][trait][name]
    if name == "checkpoints":
        r = r["shift_vs_trait_change"]
    return "r n/a" if r["r"] is None else f"r = {r['r']:.2f}, n = {r['n']}"


def _write(
    run: RunDir,
    points: list[dict[str, Any]],
    summary: dict[str, Any],
    compare_rows: list[dict[str, Any]],
    traits: list[str],
) -> None:
    from personascope.io import atomic_open
    from personascope.report.plots import plot_scatter

    columns = [c for c in points[0] if c != "shift_by_layer"] if points else []
    with atomic_open(run.file("points.csv")) as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)
    with atomic_open(run.file("summary.json")) as fh:
        json.dump({"summary": summary, "compare": compare_rows}, fh, indent=2)
    with atomic_open(run.file("points.md")) as fh:
        fh.write(format_points(points) + "\n")
    if compare_rows:
        with atomic_open(run.file("compare.md")) as fh:
            fh.write(format_compare(compare_rows) + "\n")
    for t in traits:
        mine = [p for p in points if p["trait"] == t]
        final = [p for p in mine if _is_final(p)]
        if final:
            plot_scatter(
                [p["shift"] for p in final],
                [p["trait_change"] for p in final],
                [p["model"] for p in final],
                run.file(f"shift-vs-change-{t}.png"),
                xlabel=f"finetuning shift along the {t} vector (layer {final[0]['layer']})",
                ylabel=f"change in {t} score",
                title=f"{t}: shift vs trait change across datasets ({_r_text(summary, t, 'shift_vs_trait_change')})",
            )
            usable = [p for p in final if p.get("projection_difference") is not None]
            if usable:
                plot_scatter(
                    [p["projection_difference"] for p in usable],
                    [p["trait_change"] for p in usable],
                    [p["model"] for p in usable],
                    run.file(f"projdiff-vs-change-{t}.png"),
                    xlabel=f"projection difference of the dataset on {t} (layer {usable[0]['layer']})",
                    ylabel=f"change in {t} score after finetuning",
                    title=f"{t}: screening vs trait change "
                    f"({_r_text(summary, t, 'projection_difference_vs_trait_change')})",
                )
        tracked = [p for p in mine if not _is_final(p)]
        if tracked:
            plot_scatter(
                [p["shift"] for p in tracked],
                [p["trait_change"] for p in tracked],
                [str(p["step"]) for p in tracked],
                run.file(f"checkpoints-{t}.png"),
                xlabel=f"finetuning shift along the {t} vector",
                ylabel=f"change in {t} score",
                title=f"{t}: checkpoints of {tracked[0]['dataset']} ({_r_text(summary, t, 'checkpoints')})",
            )
