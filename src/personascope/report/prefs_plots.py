"""Plots for preference runs: probe quality per layer, persona matrices, choice-steering curves."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from personascope.report.plots import _pyplot, _save


def plot_probe_layers(report: Any, path: str | Path, title: str = "utility probes by layer") -> Path:
    """Test r (with its bootstrap interval), leave-one-topic-out r and the shuffled-label control per layer, next
    to the baselines (horizontal lines); right panel: pairwise accuracy on test tasks."""
    plt = _pyplot()
    layers = [s.layer for s in report.layers]
    fig, (ax_r, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    r = np.array([s.test_r for s in report.layers], dtype=float)
    low = np.array([s.test_r_low for s in report.layers], dtype=float)
    high = np.array([s.test_r_high for s in report.layers], dtype=float)
    ax_r.plot(layers, r, "-o", markersize=3, label="probe: test r")
    ax_r.fill_between(layers, low, high, alpha=0.2)
    ax_r.plot(layers, [s.loto_r for s in report.layers], "-s", markersize=3, label="probe: leave-topic-out r (pooled)")
    ax_r.plot(
        layers, [s.loto_within_r for s in report.layers], "-^", markersize=3, label="probe: leave-topic-out r (within)"
    )
    ax_r.plot(layers, [s.test_r for s in report.shuffled], "--", color="grey", label="shuffled labels: test r")
    ax_acc.plot(layers, [s.test_pair_acc for s in report.layers], "-o", markersize=3, label="probe")
    colours = ["tab:red", "tab:purple", "tab:brown", "tab:olive"]
    for k, (name, s) in enumerate(report.baselines.items()):
        c = colours[k % len(colours)]
        ax_r.axhline(s.test_r, color=c, ls=":", label=f"{name}: test r")
        if not math.isnan(s.loto_r):
            ax_r.axhline(s.loto_r, color=c, ls="-.", lw=0.8, label=f"{name}: leave-topic-out r (pooled)")
        if not math.isnan(s.loto_within_r):
            ax_r.axhline(s.loto_within_r, color=c, ls="--", lw=0.8, label=f"{name}: leave-topic-out r (within)")
        ax_acc.axhline(s.test_pair_acc, color=c, ls=":", label=name)
    ax_r.axvline(report.best_layer, color="black", lw=0.6, alpha=0.5)
    ax_r.axhline(0, color="grey", lw=0.6)
    ax_r.set_ylim(-1, 1)
    ax_r.set_ylabel("Pearson r with utilities")
    ax_acc.axhline(0.5, color="grey", lw=0.6)
    ax_acc.set_ylim(0, 1)
    ax_acc.set_ylabel("pairwise accuracy (test tasks)")
    for ax in (ax_r, ax_acc):
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_persona_matrices(
    names: Sequence[str], matrices: Mapping[str, Any], path: str | Path, title: str = "personas"
) -> Path:
    """One annotated heatmap per matrix (rows and columns are personas; values in [-1, 1])."""
    plt = _pyplot()
    k = len(matrices)
    size = 1.2 + 0.6 * len(names)
    fig, axes = plt.subplots(
        1, k, figsize=(max(3.6, size) * k + 1.5, max(3.4, size + 1.0)), squeeze=False, constrained_layout=True
    )
    image = None
    for n, (ax, (label, matrix)) in enumerate(zip(axes[0], matrices.items(), strict=True)):
        mat = np.asarray(matrix, dtype=float)
        image = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names if n == 0 else [""] * len(names), fontsize=8)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                text = "—" if math.isnan(mat[i, j]) else f"{mat[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7)
        ax.set_title(label, fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
    fig.suptitle(title)
    return _save(plt, fig, path)


def plot_choice_steering(points: Sequence[Any], path: str | Path, title: str = "choice steering") -> Path:
    """P(choose the steered task) against the coefficient, one panel per layer; the unsteered point is shared."""
    plt = _pyplot()
    base = next((p for p in points if p.direction == "none"), None)
    layers = sorted({p.layer for p in points if p.layer is not None})
    fig, axes = plt.subplots(1, max(1, len(layers)), figsize=(4.2 * max(1, len(layers)), 3.8), squeeze=False)
    styles = {
        ("probe", "differential"): ("-o", "probe, differential"),
        ("probe", "single"): ("-s", "probe, one task"),
        ("random", "differential"): ("--x", "random, differential"),
    }
    for ax, layer in zip(axes[0], layers, strict=False):
        curves: dict[tuple[str, str], list[Any]] = {}
        for p in points:
            if p.layer == layer:
                curves.setdefault((p.direction, p.mode), []).append(p)
        for key, rows in sorted(curves.items()):
            pts = sorted(rows + ([base] if base is not None else []), key=lambda p: p.coef)
            fmt, label = styles.get(key, ("-", f"{key[0]}, {key[1]}"))
            ax.errorbar(
                [p.coef for p in pts],
                [p.p for p in pts],
                yerr=[0.0 if math.isnan(p.ci) else p.ci for p in pts],
                fmt=fmt,
                capsize=2,
                label=label,
            )
        ax.axhline(0.5, color="grey", lw=0.6)
        ax.set_ylim(0, 1)
        ax.set_xlabel("coefficient (fraction of mean residual norm)")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("P(choose the steered task)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(plt, fig, path)
