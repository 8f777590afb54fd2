"""A small preference run on the bundled model: the whole pipeline runs and its outputs are well-formed.

Nothing here asserts that the results are good (a 135M model has little to say about tasks); only that each step
produces what it promises.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from personascope.preferences.pipeline import (
    ElicitConfig,
    run_elicit,
    run_fit,
    run_personas,
    run_probe,
    run_steer,
)

pytestmark = pytest.mark.slow


def test_small_preference_run_on_the_bundled_model(bundled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "prefs"
    cfg = ElicitConfig(personas=["assistant", "evil"], n_tasks=24, budget=24, batch_size=16)
    res = run_elicit(cfg, out, model=bundled, progress=False)
    for info in res.per_persona.values():
        assert info["n_pairs"] == 24 and 0 < info["mean_label_mass"] <= 1 and 0 < info["position_bias"] < 1

    fit = run_fit(out)
    for persona in ("assistant", "evil"):
        mu = fit.utilities[persona]
        assert mu.shape == (24,) and np.isfinite(mu).all() and abs(mu.std() - 1) < 1e-6

    probe = run_probe(out, model=bundled)
    report = probe.report
    assert len(report.layers) == bundled.num_layers + 1 and set(report.baselines) == {"embedding", "topic"}
    assert all(-1 <= s.test_r <= 1 for s in report.layers if not math.isnan(s.test_r))
    assert 0 <= report.best.test_pair_acc <= 1
    assert probe.files["png"].stat().st_size > 0

    personas = run_personas(out, model=bundled)
    assert personas.utility_r.shape == (2, 2) and np.allclose(np.diag(personas.utility_r), 1.0)

    steer = run_steer(
        out, model=bundled, layers=[report.best_layer], coefs=[-0.5, 0.5], n_pairs=2, single=False, progress=False
    )
    assert len(steer.swings) == 2 and all(-1 <= s["swing"] <= 1 for s in steer.swings)
    data = json.loads((out / "steer.json").read_text())
    assert data["residual_norms"][str(report.best_layer)] > 0
