from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

import personascope as ps
from personascope.errors import PersonascopeError
from personascope.judges import JudgeItem, JudgeResult
from personascope.pipelines.monitor_experiments import MonitorExperimentConfig, build_points, run_monitor_experiment
from personascope.testing import tiny_model
from personascope.traits import TraitSpec, load_trait


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


@pytest.mark.parametrize("kind", ["prompts", "manyshot"])
def test_experiment_end_to_end(tmp_path: Path, model, kind: str) -> None:  # type: ignore[no-untyped-def]
    cfg = MonitorExperimentConfig(
        kind=kind,
        vector=str(_vector(model, tmp_path)),
        n_questions=3,
        samples_per_question=1,
        max_new_tokens=4,
        shots=[0, 1, 2],
    )
    res = run_monitor_experiment(cfg, tmp_path / "run", model=model, judge=QuestionLengthJudge())
    assert 1 <= res.best_layer <= model.num_layers
    assert len(res.r_by_layer) == model.num_layers + 1
    assert -1 <= res.r <= 1 and res.r_ci[0] <= res.r <= res.r_ci[1]
    for name in ("points.csv", "scatter.png", "r_by_layer.png", "summary.json"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_layer"] == res.best_layer
    again = run_monitor_experiment(cfg, tmp_path / "run", model=model, judge=QuestionLengthJudge())
    assert again.r == pytest.approx(res.r)
