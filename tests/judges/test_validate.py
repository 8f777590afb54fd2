from __future__ import annotations

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
