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
from personascope.pipelines.sweep import SweepConfig, _monotone, default_layers, sweep
from personascope.testing import tiny_model
from personascope.traits import TraitSpec, load_trait
from tests.figures import keep_figures


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
    torch.manual_seed(1)  # not the sweep's seed (0), which draws the random-direction control
    v = ps.PersonaVector.for_model(model, torch.randn(model.num_layers + 1, model.hidden_size), trait="evil")
    return v.save(tmp_path / "vectors" / "evil_response_mean.safetensors")


def _keep_figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Keep every Figure the report plots save (they are still written to disk)."""
    import personascope.report.plots as plots

    return keep_figures(monkeypatch, plots)


def _mean_ci(values: list[float]) -> tuple[float, float]:
    a = np.array(values, dtype=float)
    return float(a.mean()), float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a)))


def test_sweep_end_to_end(tmp_path: Path, model, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    figures = _keep_figures(monkeypatch)
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
    questions = list(load_trait("evil").evaluation_questions[:3])
    assert [g["question"] for g in gens[:3]] == questions

    # every cell is the mean (and 95% t-interval) of the judge's scores of its generations, computed here by hand
    groups: dict[tuple[str, int | None, float], list[float]] = {}
    for g in gens:
        groups.setdefault((g["direction"], g["layer"], float(g["coef"])), []).append(float(min(100, len(g["answer"]))))
    expected_keys = {("base", None, 0.0)} | {
        (d, layer, c) for d in ("vector", "random") for layer in (1, 2) for c in (-2.0, 2.0, 4.0)
    }
    assert set(groups) == expected_keys
    cells = {(c.direction, c.layer, c.coef): c for c in result.cells}
    assert set(cells) == expected_keys
    for key, scores in groups.items():
        mean, ci = _mean_ci(scores)
        cell = cells[key]
        assert cell.n == 3 and cell.trait == pytest.approx(mean) and cell.coherence == pytest.approx(80.0)
        assert cell.coherence_ci == pytest.approx(0.0)
        assert cell.trait_ci == pytest.approx(ci, nan_ok=True)
    # table.csv and summary.json hold the same cells
    with (tmp_path / "sweep" / "table.csv").open() as fh:
        table = {
            (r["direction"], None if r["layer"] == "" else int(r["layer"]), float(r["coef"])): r
            for r in csv.DictReader(fh)
        }
    assert set(table) == expected_keys
    for key, row in table.items():
        assert float(row["trait"]) == pytest.approx(cells[key].trait) and int(row["n"]) == 3
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert len(summary["cells"]) == len(expected_keys)
    md = (tmp_path / "sweep" / "table.md").read_text().splitlines()
    assert len(md) == 2 + len(expected_keys)
    assert f"| vector | 2 | 4 | {cells['vector', 2, 4.0].trait:.1f} ± " in "\n".join(md)

    # the recommendation: the positive vector cell with the largest rise over the baseline (ties: smaller coef)
    base = float(np.mean(groups["base", None, 0.0]))
    best = max(
        ((layer, c) for (d, layer, c) in expected_keys if d == "vector" and c > 0),
        key=lambda k: (np.mean(groups["vector", k[0], k[1]]) - base, -k[1]),
    )
    assert result.recommended is not None
    assert (result.recommended["layer"], result.recommended["coef"]) == best
    assert result.recommended["trait_change"] == pytest.approx(np.mean(groups["vector", *best]) - base)
    assert summary["recommended"] == pytest.approx(result.recommended)
    vec = ps.PersonaVector.load(path)
    assert vec.chosen_layer == best[0] and vec.metadata["chosen_coef"] == best[1]

    # the plot: trait and coherence against the coefficient, one line per (direction, layer), the baseline at 0
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    assert fig.texts[0].get_text() == "evil: steering sweep"
    trait_ax, coh_ax = fig.axes
    assert trait_ax.get_xlabel() == coh_ax.get_xlabel() == "steering coefficient"
    assert (trait_ax.get_ylabel(), coh_ax.get_ylabel()) == ("trait score", "coherence")
    series = [("random", 1), ("random", 2), ("vector", 1), ("vector", 2)]
    for ax, attr in ((trait_ax, "trait"), (coh_ax, "coherence")):
        assert [c.get_label() for c in ax.containers] == ["layer 1 (random)", "layer 2 (random)", "layer 1", "layer 2"]
        for container, (d, layer) in zip(ax.containers, series, strict=True):
            xy = container.lines[0].get_xydata()
            assert xy[:, 0].tolist() == [-2.0, 0.0, 2.0, 4.0]
            keys = [(d, layer, -2.0), ("base", None, 0.0), (d, layer, 2.0), (d, layer, 4.0)]
            want = [np.mean(groups[k]) for k in keys] if attr == "trait" else [80.0] * 4
            np.testing.assert_allclose(xy[:, 1], want)


def test_coefficients_in_one_batch_match_separate_runs(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    path = _vector(model, tmp_path)
    cfg = SweepConfig(
        vector=str(path),
        model="tiny",
        layers=[2],
        coefs=[3],
        n_questions=2,
        max_new_tokens=5,
        temperature=0,
    )
    sweep(cfg, tmp_path / "sweep", model=model, judge=LengthJudge())
    gens = [json.loads(x) for x in (tmp_path / "sweep" / "generations.jsonl").read_text().splitlines()]
    vec = ps.PersonaVector.load(path)
    trait = load_trait("evil")
    convs = [[{"role": "user", "content": q}] for q in trait.evaluation_questions[:2]]

    def answers(direction: str) -> list[str]:
        return [g["answer"] for g in gens if g["direction"] == direction]

    with ps.steering(model, vec, 2, 3.0, positions="last_prompt_and_response"):
        direct = ps.generate(model, convs, max_new_tokens=5, temperature=0)
    assert answers("vector") == [d.text for d in direct]
    # the baseline is the unsteered model
    assert answers("base") == [d.text for d in ps.generate(model, convs, max_new_tokens=5, temperature=0)]
    # the control: a direction drawn from the run's seed, rescaled to the vector's norm at that layer
    torch.manual_seed(cfg.seed)
    noise = torch.randn(model.num_layers + 1, model.hidden_size)[2]
    control = noise * (vec.directions[2].norm() / noise.norm())
    assert float(control.norm()) == pytest.approx(float(vec.directions[2].norm()), rel=1e-5)
    with ps.steering(model, control, 2, 3.0, positions="last_prompt_and_response"):
        direct_random = ps.generate(model, convs, max_new_tokens=5, temperature=0)
    assert answers("random") == [d.text for d in direct_random] != answers("vector")


def test_monotone_flags() -> None:
    from personascope.pipelines.sweep import Cell

    base = Cell("base", None, 0.0, 20, 1, 80, 1, 5)
    cells = [Cell("vector", 3, c, t, 1, 80, 1, 5) for c, t in ((-2, 10), (-1, 15), (1, 30), (2, 40), (3, 50))]
    assert _monotone(cells, base, 3) == {"rises_with_positive": True, "falls_with_negative": True}
    cells[3] = Cell("vector", 3, 2, 25, 1, 80, 1, 5)
    assert _monotone(cells, base, 3) == {"rises_with_positive": False, "falls_with_negative": True}
    cells[0] = Cell("vector", 3, -2, 18, 1, 80, 1, 5)  # 20 → 15 → 18 going down the negative coefficients
    assert _monotone(cells, base, 3) == {"rises_with_positive": False, "falls_with_negative": False}
    # fewer than three positive coefficients never count as rising; other layers are ignored
    short = [Cell("vector", 3, c, t, 1, 80, 1, 5) for c, t in ((1, 30), (2, 40))] + [
        Cell("vector", 4, 3, 90, 1, 80, 1, 5)
    ]
    assert _monotone(short, base, 3) == {"rises_with_positive": False, "falls_with_negative": False}


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


class CountingJudge(LengthJudge):
    def __init__(self) -> None:
        self.calls = 0

    def trait_scores(self, trait: TraitSpec, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        self.calls += len(items)
        return super().trait_scores(trait, items)


def test_rerunning_a_finished_sweep_with_new_settings(tmp_path: Path, model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from personascope.pipelines import common

    path = _vector(model, tmp_path)
    base = dict(vector=str(path), model="tiny", layers=[1], coefs=[2], n_questions=2, max_new_tokens=4)
    judge = CountingJudge()
    first = sweep(SweepConfig(**base, coherence_threshold=50), tmp_path / "sweep", model=model, judge=judge)
    n_replies = 2 * (1 + 2)  # baseline + vector + random, two questions each
    assert judge.calls == n_replies and first.recommended is not None
    assert ps.PersonaVector.load(path).chosen_layer == 1  # the sweep wrote its choice back into the vector file
    generated: list[int] = []
    real = common.generate
    monkeypatch.setattr(common, "generate", lambda m, c, **kw: generated.append(len(c)) or real(m, c, **kw))
    # the same sweep again (the vector file changed: its chosen layer) and a stricter recommendation: no new replies
    said: list[str] = []
    strict = sweep(
        SweepConfig(**base, coherence_threshold=90), tmp_path / "sweep", model=model, judge=judge, say=said.append
    )
    assert generated == [] and judge.calls == n_replies
    assert strict.recommended is None  # coherence 80 < 90 everywhere
    assert said == [
        "re-running recommend (recommend: coherence_threshold changed); old outputs kept under "
        f"{tmp_path / 'sweep' / 'stale'}"
    ]
    # one more coefficient adds only its replies
    more = sweep(SweepConfig(**{**base, "coefs": [2, 4]}), tmp_path / "sweep", model=model, judge=judge)
    assert sum(generated) == 2 * 2 and judge.calls == n_replies + 4  # vector and random, two questions each
    assert {(c.direction, c.coef) for c in more.cells} >= {("vector", 4.0), ("random", 4.0)}
    # new sampling settings redo every reply
    sweep(SweepConfig(**{**base, "coefs": [2, 4]}, temperature=0.5), tmp_path / "sweep", model=model, judge=judge)
    assert sum(generated) == 4 + 2 * (1 + 2 + 2)
