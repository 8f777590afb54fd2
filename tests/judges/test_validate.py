from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from personascope.judges.base import JudgeItem, JudgeResult
from personascope.judges.validate import validate_judge
from personascope.traits import TraitSpec, load_labelled


class OracleJudge:
    """Knows the labels: 90 for trait answers, 10 otherwise; one answer per trait gets no score."""

    id = "oracle"

    def __init__(self, flip: bool = False) -> None:
        self.flip = flip

    def trait_scores(self, trait: TraitSpec, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        labels = {(a.question, a.answer): a.label for a in load_labelled(trait.name)}
        out = []
        for i, it in enumerate(items):
            positive = labels[(it.question, it.answer)] == 1
            if self.flip:
                positive = not positive
            out.append(JudgeResult(None) if i == 0 else JudgeResult(90.0 if positive else 10.0))
        out[1] = JudgeResult(None, error="judge unavailable")
        return out

    def coherence_scores(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return [JudgeResult(80.0) for _ in items]

    def cache_scope(self, trait: TraitSpec | None) -> str:
        return "oracle"


def test_perfect_judge_has_auroc_one() -> None:
    rows = validate_judge(OracleJudge(), ["evil", "humorous"])
    assert [r["trait"] for r in rows] == ["evil", "humorous"]
    for row in rows:
        labelled = load_labelled(row["trait"])
        assert row["judge"] == "oracle"
        assert row["n"] == len(labelled) == row["n_pos"] + row["n_neg"]
        assert row["n_pos"] > 0 and row["n_neg"] > 0
        assert row["n_unscored"] == 1 and row["n_errors"] == 1
        assert row["n_scored"] == row["n"] - 2
        assert row["auroc"] == pytest.approx(1.0)
        assert row["mean_pos"] == pytest.approx(90.0) and row["mean_neg"] == pytest.approx(10.0)
        assert row["coherence_mean"] == pytest.approx(80.0) and row["coherence_scored"] == row["n"]


def test_inverted_judge_has_auroc_zero() -> None:
    [row] = validate_judge(OracleJudge(flip=True), ["sycophantic"])
    assert row["auroc"] == pytest.approx(0.0)


def graded(text: str) -> JudgeResult:
    """A score that depends only on the text: ties, no score, errors and a non-finite score all occur."""
    n = sum(map(ord, text))
    if n % 13 == 0:
        return JudgeResult(None)
    if n % 17 == 0:
        return JudgeResult(None, error="judge unavailable")
    if n % 19 == 0:
        return JudgeResult(float("nan"))
    return JudgeResult(float(n % 7) * 15.0)


class GradedJudge:
    id = "graded"

    def trait_scores(self, trait: TraitSpec, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return [graded(it.answer) for it in items]

    def coherence_scores(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return [graded(it.question + it.answer) for it in items]

    def cache_scope(self, trait: TraitSpec | None) -> str:
        return "graded"


def hand_auroc(pos: list[float], neg: list[float]) -> float:
    """P(score of a positive > score of a negative), ties counting one half: the Mann-Whitney count."""
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def finite_score(r: JudgeResult) -> float | None:
    return r.score if r.error is None and r.score is not None and math.isfinite(r.score) else None


@pytest.mark.parametrize("trait", ["evil", "humorous", "sycophantic"])
def test_graded_judge_matches_hand_counts(trait: str) -> None:
    labelled = load_labelled(trait)
    [row] = validate_judge(GradedJudge(), [trait])
    results = [graded(a.answer) for a in labelled]
    pos = [s for r, a in zip(results, labelled, strict=True) if a.label == 1 and (s := finite_score(r)) is not None]
    neg = [s for r, a in zip(results, labelled, strict=True) if a.label == 0 and (s := finite_score(r)) is not None]
    errors = sum(r.error is not None for r in results)
    nan = sum(r.score is not None and math.isnan(r.score) for r in results)
    # the test data exercise every case: errors, no score, NaN, ties, several values
    assert errors > 0 and nan > 0 and len(pos) + len(neg) + errors + nan < len(labelled)
    assert len(set(pos + neg)) > 2 and len(pos) + len(neg) > len(set(pos + neg))
    auroc = hand_auroc(pos, neg)
    assert 0.05 < auroc < 0.95 and auroc != 0.5
    coherent = [s for a in labelled if (s := finite_score(graded(a.question + a.answer))) is not None]
    assert len(coherent) < len(labelled)
    assert row == {
        "trait": trait,
        "judge": "graded",
        "n": len(labelled),
        "n_pos": sum(a.label == 1 for a in labelled),
        "n_neg": sum(a.label == 0 for a in labelled),
        "n_scored": len(pos) + len(neg),
        "n_unscored": len(labelled) - len(pos) - len(neg) - errors,
        "n_errors": errors,
        "auroc": pytest.approx(auroc, abs=1e-12),
        "mean_pos": pytest.approx(sum(pos) / len(pos)),
        "mean_neg": pytest.approx(sum(neg) / len(neg)),
        "coherence_mean": pytest.approx(sum(coherent) / len(coherent)),
        "coherence_scored": len(coherent),
    }


def test_auroc_needs_both_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    from personascope.judges import validate

    real = validate.load_labelled
    monkeypatch.setattr(validate, "load_labelled", lambda name: [a for a in real(name) if a.label == 1])
    [row] = validate_judge(OracleJudge(), ["evil"])
    assert row["auroc"] is None and row["n_neg"] == 0 and row["mean_neg"] is None
    assert row["mean_pos"] == pytest.approx(90.0)
