"""Keep the matplotlib Figures the report plots save, so tests can check their axes and plotted data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def keep_figures(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[Any]:
    """Every Figure ``module._save`` writes from now on (they are still written to disk)."""
    figures: list[Any] = []
    real = module._save

    def keep(plt: Any, fig: Any, path: Any) -> Path:
        figures.append(fig)
        return Path(real(plt, fig, path))

    monkeypatch.setattr(module, "_save", keep)
    return figures
