from __future__ import annotations

import math

import pytest

from personascope.judges.base import COHERENCE_RUBRIC, Judge, JudgeItem, JudgeResult, logprob_score


def lp(p: float) -> float:
    return math.log(p)


def test_weighted_mean_of_integer_tokens() -> None:
    score = logprob_score({"80": lp(0.5), "90": lp(0.3), "100": lp(0.2)})
    assert score == pytest.approx((80 * 0.5 + 90 * 0.3 + 100 * 0.2) / 1.0)


def test_renormalises_over_integer_mass() -> None:
    # 0.4 on numbers, 0.6 on words: the words are ignored and the numbers renormalised
    score = logprob_score({"0": lp(0.1), "50": lp(0.3), "Sure": lp(0.6)})
    assert score == pytest.approx((0 * 0.1 + 50 * 0.3) / 0.4)


def test_ignores_non_integers_and_values_above_100() -> None:
    tokens = {"42": lp(0.3), "101": lp(0.3), "-5": lp(0.1), "4.5": lp(0.1), "seven": lp(0.1), "": lp(0.1)}
    assert logprob_score(tokens) == pytest.approx(42.0)


def test_whitespace_is_stripped() -> None:
    score = logprob_score({" 20": lp(0.25), "20\n": lp(0.25), "\t60 ": lp(0.5)})
    assert score == pytest.approx((20 * 0.5 + 60 * 0.5) / 1.0)


def test_mass_cut_off() -> None:
    assert logprob_score({"70": lp(0.2), "No": lp(0.8)}) is None
    assert logprob_score({"70": lp(0.3), "No": lp(0.7)}) == pytest.approx(70.0)
    assert logprob_score({"70": lp(0.2)}, min_mass=0.1) == pytest.approx(70.0)
    assert logprob_score({}) is None
    assert logprob_score({"yes": 0.0}) is None


def test_nan_and_impossible_tokens() -> None:
    # a NaN log-probability is skipped; -inf is probability 0 (counts, adds nothing)
    assert logprob_score({"10": lp(0.5), "90": float("nan")}) == pytest.approx(10.0)
    assert logprob_score({"10": lp(0.5), "90": float("-inf")}) == pytest.approx(10.0)
    assert logprob_score({"90": float("-inf")}, min_mass=0.0) is None  # no mass at all
    # the cut-off is inclusive: exactly min_mass on numbers is enough
    assert logprob_score({"30": lp(0.5), "40": lp(0.5)}, min_mass=1.0) == pytest.approx(35.0)
    assert logprob_score({"30": lp(0.5), "x": lp(0.5)}, min_mass=0.5) == pytest.approx(30.0)
    assert logprob_score({"30": lp(0.5), "x": lp(0.5)}, min_mass=0.5000001) is None


def test_non_ascii_digits_ignored() -> None:
    assert logprob_score({"٣": lp(0.9), "5": lp(0.1)}, min_mass=0.05) == pytest.approx(5.0)


def test_rubric_and_dataclasses() -> None:
    text = COHERENCE_RUBRIC.format(question="Q?", answer="A.")
    assert "Q?" in text and "A." in text and "0 to 100" in text
    assert JudgeResult(50.0).error is None
    assert JudgeItem("q", "a") == JudgeItem("q", "a")

    class Fake:
        id = "fake"

        def trait_scores(self, trait, items):  # type: ignore[no-untyped-def]
            return [JudgeResult(None) for _ in items]

        def coherence_scores(self, items):  # type: ignore[no-untyped-def]
            return [JudgeResult(None) for _ in items]

        def cache_scope(self, trait):  # type: ignore[no-untyped-def]
            return "x"

    assert isinstance(Fake(), Judge)
