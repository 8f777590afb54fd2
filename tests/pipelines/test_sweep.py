from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

import personascope as ps
from personascope.errors import PersonascopeError
from personascope.judges import JudgeItem, JudgeResult
from personascope.pipelines.sweep import SweepConfig, _monotone, default_layers, sweep
from personascope.testing import tiny_model
from personascope.traits import TraitSpec


class LengthJudge:
    """Trait = answer length in characters (capped at 100); coherence fixed."""

    id = "fake:length"

    def cache_scope(self, trait: TraitSpec | None) -> str:
        return "fake"

    def trait_scores(self, trait: TraitSpec, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return [JudgeResult(float(min(100, len(i.answer)))) for i in items]

    def coherence_scores(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return [JudgeResult(80.0) for _ in items]


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return tiny_model("llama")


def _vector(model, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    v = ps.PersonaVector.for_model(model, torch.randn(model.num_layers + 1, model.hidden_size), trait="evil")
    return v.save(tmp_path / "vectors" / "evil_response_mean.safetensors")


def test_sweep_end_to_end(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    path = _vector(model, tmp_path)
    cfg = SweepConfig(
        vector=str(path),
        model="tiny",
        layers=[1, 2],
        coefs=[-2, 2, 4],
        n_questions=3,
        max_new_tokens=5,
        coherence_threshold=50,
    )
    result = sweep(cfg, tmp_path / "sweep", model=model, judge=LengthJudge())
    gens = [json.loads(x) for x in (tmp_path / "sweep" / "generations.jsonl").read_text().splitlines()]
    # baseline once (3 questions) + 2 layers × 2 directions × 3 non-zero coefs × 3 questions
    assert len(gens) == 3 + 2 * 2 * 3 * 3
    cells = {(c.direction, c.layer, c.coef): c for c in result.cells}
    assert ("base", None, 0.0) in cells and ("random", 2, 4.0) in cells
    assert all(c.n == 3 for c in result.cells)
    for name in ("table.csv", "table.md", "summary.json", "sweep.png"):
        assert (tmp_path / "sweep" / name).stat().st_size > 0
    assert result.recommended is not None and result.recommended["coef"] > 0
    vec = ps.PersonaVector.load(path)
    assert vec.chosen_layer == result.recommended["layer"]
    assert vec.metadata["chosen_coef"] == result.recommended["coef"]


def test_coefficients_in_one_batch_match_separate_runs(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    path = _vector(model, tmp_path)
    cfg = SweepConfig(
        vector=str(path),
        model="tiny",
        layers=[2],
        coefs=[3],
        n_questions=2,
        max_new_tokens=5,
        random_control=False,
        temperature=0,
    )
    sweep(cfg, tmp_path / "sweep", model=model, judge=LengthJudge())
    gens = [json.loads(x) for x in (tmp_path / "sweep" / "generations.jsonl").read_text().splitlines()]
    vec = ps.PersonaVector.load(path)
    from personascope.traits import load_trait

    trait = load_trait("evil")
    convs = [[{"role": "user", "content": q}] for q in trait.evaluation_questions[:2]]
    with ps.steering(model, vec, 2, 3.0, positions="last_prompt_and_response"):
        direct = ps.generate(model, convs, max_new_tokens=5, temperature=0)
    steered = [g for g in gens if g["direction"] == "vector"]
    assert [g["answer"] for g in steered] == [d.text for d in direct]


def test_monotone_flags() -> None:
    from personascope.pipelines.sweep import Cell

    base = Cell("base", None, 0.0, 20, 1, 80, 1, 5)
    cells = [Cell("vector", 3, c, t, 1, 80, 1, 5) for c, t in ((-2, 10), (-1, 15), (1, 30), (2, 40), (3, 50))]
    assert _monotone(cells, base, 3) == {"rises_with_positive": True, "falls_with_negative": True}
    cells[3] = Cell("vector", 3, 2, 25, 1, 80, 1, 5)
    assert _monotone(cells, base, 3)["rises_with_positive"] is False


def test_sweep_errors(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    path = _vector(model, tmp_path)
    with pytest.raises(PersonascopeError, match="out of range"):
        sweep(SweepConfig(vector=str(path), layers=[9]), tmp_path / "s1", model=model, judge=LengthJudge())
    with pytest.raises(PersonascopeError, match="needs scores"):
        sweep(SweepConfig(vector=str(path), judge="none"), tmp_path / "s2", model=model)
    other = ps.PersonaVector(torch.randn(5, 8), {"model_name": "x", "trait": "evil"}).save(tmp_path / "o.safetensors")
    with pytest.raises(PersonascopeError, match="does not fit"):
        sweep(SweepConfig(vector=str(other)), tmp_path / "s3", model=model, judge=LengthJudge())
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s3").exists()
    assert default_layers(30) == [10, 15, 20]
