"""Plots written next to a run's tables (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    """Write the figure atomically as PNG and free it."""
    from personascope.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def plot_sweep(cells: Sequence[Any], path: str | Path, title: str = "steering sweep") -> Path:
    """Trait and coherence against the coefficient, one line per layer (random-direction controls dashed)."""
    plt = _pyplot()
    baseline = next((c for c in cells if c.direction == "base"), None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[tuple[str, int], list[Any]] = {}
    for c in cells:
        if c.direction != "base":
            series.setdefault((c.direction, c.layer), []).append(c)
    for (direction, layer), rows in sorted(series.items()):
        pts = sorted(rows + ([baseline] if baseline is not None else []), key=lambda c: c.coef)
        style = "-o" if direction == "vector" else "--x"
        label = f"layer {layer}" + (" (random)" if direction == "random" else "")
        for ax, attr in zip(axes, ("trait", "coherence"), strict=True):
            ax.errorbar(
                [c.coef for c in pts],
                [getattr(c, attr) for c in pts],
                yerr=[getattr(c, f"{attr}_ci") for c in pts],
                fmt=style,
                capsize=2,
                label=label,
                alpha=1.0 if direction == "vector" else 0.6,
            )
    for ax, name in zip(axes, ("trait score", "coherence"), strict=True):
        ax.set_xlabel("steering coefficient")
        ax.set_ylabel(name)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_turns(rows: Sequence[Any], path: str | Path, title: str = "projection per turn") -> Path:
    """Projection per turn, one line per conversation and kind (before the reply: solid; the reply: dotted)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict[tuple[int, str, int], list[Any]] = {}
    for r in rows:
        series.setdefault((r.conversation, r.kind, r.layer), []).append(r)
    for (conv, kind, layer), pts in sorted(series.items()):
        pts = sorted(pts, key=lambda r: r.turn)
        ax.plot(
            [r.turn + 1 for r in pts],
            [r.projection for r in pts],
            "-o" if kind == "prompt_last" else ":s",
            label=f"conv {conv} {kind} (layer {layer})",
        )
    ax.set_xlabel("turn")
    ax.set_ylabel("projection on persona direction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_scatter(
    x: Sequence[float],
    y: Sequence[float],
    groups: Sequence[str],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """A scatter coloured by group (rung, shot count, dataset)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for g in dict.fromkeys(groups):
        idx = [i for i, gg in enumerate(groups) if gg == g]
        ax.scatter([x[i] for i in idx], [y[i] for i in idx], s=18, label=str(g), alpha=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="group")
    ax.set_title(title)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_r_by_layer(r_by_layer: Sequence[float], path: str | Path, title: str = "r by layer") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(r_by_layer)), r_by_layer, "-o", markersize=3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("Pearson r")
    ax.set_ylim(-1, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    return _save(plt, fig, path)
