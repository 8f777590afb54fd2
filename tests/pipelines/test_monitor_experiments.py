from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

import personascope as ps
from personascope.errors import PersonascopeError
from personascope.judges import JudgeItem, JudgeResult
from personascope.pipelines.monitor_experiments import MonitorExperimentConfig, build_points, run_monitor_experiment
from personascope.testing import tiny_model
from personascope.traits import TraitSpec, load_trait
from tests.figures import keep_figures


class QuestionLengthJudge:
    id = "fake:qlen"

    def cache_scope(self, trait: TraitSpec | None) -> str:
        return "fake"

    def trait_scores(self, trait: TraitSpec, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return [JudgeResult(float(len(i.question) + len(i.answer) % 7)) for i in items]

    def coherence_scores(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return [JudgeResult(70.0) for _ in items]


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return tiny_model("llama")


def _vector(model, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    v = ps.PersonaVector.for_model(model, torch.randn(model.num_layers + 1, model.hidden_size), trait="evil")
    return v.save(tmp_path / "v.safetensors")


def test_points_for_both_designs() -> None:
    trait = load_trait("evil")
    prompts = build_points("prompts", trait, MonitorExperimentConfig(kind="prompts", vector="x", n_questions=3))
    assert len(prompts) == 8 * 3 and prompts[0].conversation[0]["content"] == trait.monitor_ladder[0]
    cfg = MonitorExperimentConfig(kind="manyshot", vector="x", n_questions=2, shots=[0, 2, 4])
    shots = build_points("manyshot", trait, cfg)
    assert len(shots) == 2 * (1 + 2 + 2)
    four = next(p for p in shots if p.group == "4 trait shots").conversation
    assert len(four) == 9 and [m["role"] for m in four[:2]] == ["user", "assistant"]
    assert build_points("manyshot", trait, cfg)[3].conversation == shots[3].conversation  # deterministic
    with pytest.raises(PersonascopeError, match="unknown monitoring experiment"):
        build_points("other", trait, cfg)
    with pytest.raises(PersonascopeError, match="shots are available"):
        build_points("manyshot", trait, MonitorExperimentConfig(kind="manyshot", vector="x", shots=[500]))


def _keep_figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Keep every Figure the report plots save (they are still written to disk)."""
    import personascope.report.plots as plots

    return keep_figures(monkeypatch, plots)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.pearsonr(x, y).statistic)


@pytest.mark.parametrize("kind", ["prompts", "manyshot"])
def test_experiment_end_to_end(tmp_path: Path, model, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    figures = _keep_figures(monkeypatch)
    vector_path = _vector(model, tmp_path)
    cfg = MonitorExperimentConfig(
        kind=kind,
        vector=str(vector_path),
        n_questions=3,
        samples_per_question=1,
        max_new_tokens=4,
        shots=[0, 1, 2],
    )
    res = run_monitor_experiment(cfg, tmp_path / "run", model=model, judge=QuestionLengthJudge())
    trait = load_trait("evil")
    points = build_points(kind, trait, cfg)
    n_groups = 8 if kind == "prompts" else 5  # 8 rungs, or 0 shots + 1 and 2 trait / control shots
    assert len(points) == 3 * n_groups and res.n_points == len(points)

    # reference: the judge's scores by hand from the rollouts, projections from raw captured activations
    rollouts = [json.loads(x) for x in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert [r["point"] for r in rollouts] == [p.key for p in points]
    y = np.array([len(r["question"]) + len(r["answer"]) % 7 for r in rollouts], dtype=float)
    vec = ps.PersonaVector.load(vector_path)
    acts = ps.capture(model, [p.conversation for p in points], reductions=["prompt_last"])["prompt_last"]
    unit = vec.directions / vec.directions.norm(dim=-1, keepdim=True)
    x = (acts * unit).sum(-1).numpy()  # [P, L+1]
    r_by_layer = [_pearson(x[:, layer], y) for layer in range(model.num_layers + 1)]
    assert len(res.r_by_layer) == model.num_layers + 1
    # layer 0 (the embeddings) sees the same last prompt token everywhere: left out, its r is only rounding noise
    np.testing.assert_allclose(res.r_by_layer[1:], r_by_layer[1:], atol=1e-4)
    best = 1 + int(np.nanargmax(r_by_layer[1:]))
    assert res.best_layer == best and res.r == pytest.approx(r_by_layer[best], abs=1e-4)
    assert res.r_ci[0] <= res.r <= res.r_ci[1]
    groups = [p.group for p in points]
    assert list(res.within) == list(dict.fromkeys(groups))
    for g, r in res.within.items():
        idx = [i for i, gg in enumerate(groups) if gg == g]
        assert r == pytest.approx(_pearson(x[idx, best], y[idx]), abs=1e-4, nan_ok=True)
    finite = [v for v in res.within.values() if not np.isnan(v)]
    assert res.mean_within == pytest.approx(np.mean(finite) if finite else float("nan"), nan_ok=True)

    with (tmp_path / "run" / "points.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [row["point"] for row in table] == [p.key for p in points]
    assert [row["group"] for row in table] == groups
    np.testing.assert_allclose([float(row["trait_score"]) for row in table], y, atol=1e-3)
    np.testing.assert_allclose([float(row[f"projection_layer_{best}"]) for row in table], x[:, best], atol=1e-3)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_layer"] == best and summary["r"] == pytest.approx(res.r)
    assert summary["n_points"] == len(points)

    # the plots: the points of each group at (projection at the best layer, score); r against the layer
    scatter, by_layer = figures
    (ax,) = scatter.axes
    assert ax.get_xlabel() == f"last-prompt-token projection (layer {best})"
    assert ax.get_ylabel() == "trait score of the answers"
    assert ax.get_title() == f"evil: {kind} (r = {r_by_layer[best]:.2f})"
    assert [c.get_label() for c in ax.collections] == list(dict.fromkeys(groups))
    for coll in ax.collections:
        idx = [i for i, gg in enumerate(groups) if gg == coll.get_label()]
        np.testing.assert_allclose(coll.get_offsets(), np.column_stack([x[idx, best], y[idx]]), atol=1e-4)
    (ax,) = by_layer.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("layer", "Pearson r", f"evil: {kind}, r by layer")
    xy = ax.lines[0].get_xydata()
    assert xy[:, 0].tolist() == list(range(model.num_layers + 1))
    np.testing.assert_allclose(xy[:, 1], res.r_by_layer)

    # resuming generates nothing new and reports the same
    again = run_monitor_experiment(cfg, tmp_path / "run", model=model, judge=QuestionLengthJudge())
    assert (tmp_path / "run" / "rollouts.jsonl").read_text().count("\n") == len(points)
    assert again.r == pytest.approx(res.r) and again.r_ci == pytest.approx(res.r_ci)
