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


def plot_sweep(cells: Sequence[Any], path: str | Path, title: str = "steering sweep") -> Path:
    """Trait and coherence against the coefficient, one line per layer (random-direction controls dashed)."""
    from personascope.io import atomic_path

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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)
