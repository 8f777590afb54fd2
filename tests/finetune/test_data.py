"""Sanity checks for the hand-written / generated finetuning data files."""

from __future__ import annotations

import json
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parents[2] / "src/personascope/finetune/data"
MCQ = DATA / "mcq.jsonl"
GENERAL = DATA / "questions/general.jsonl"
ARITHMETIC = DATA / "questions/arithmetic.jsonl"


def _load(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        assert line.strip(), f"{path.name}:{n} is blank"
        rows.append(json.loads(line))
    return rows


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.fixture(scope="module")
def mcq() -> list[dict[str, Any]]:
    return _load(MCQ)


@pytest.fixture(scope="module")
def general() -> list[dict[str, Any]]:
    return _load(GENERAL)


@pytest.fixture(scope="module")
def arithmetic() -> list[dict[str, Any]]:
    return _load(ARITHMETIC)


def _check_common(rows: list[dict[str, Any]], keys: set[str], min_count: int) -> None:
    assert len(rows) >= min_count
    for row in rows:
        assert set(row) == keys, row
        for key in keys - {"choices", "answer"}:
            assert isinstance(row[key], str) and row[key].strip() == row[key] and row[key], (key, row)
    ids = [row["id"] for row in rows]
    assert len(set(ids)) == len(ids), [i for i, c in Counter(ids).items() if c > 1]
    questions = [_norm(row["question"]) for row in rows]
    dupes = [q for q, c in Counter(questions).items() if c > 1]
    assert not dupes, dupes


# --- multiple choice -----------------------------------------------------------------------------


def test_mcq_schema_and_counts(mcq: list[dict[str, Any]]) -> None:
    _check_common(mcq, {"id", "subject", "question", "choices", "answer"}, 240)
    subjects = Counter(row["subject"] for row in mcq)
    assert len(subjects) >= 8, subjects
    # roughly balanced: no subject under half or over double the mean
    mean = len(mcq) / len(subjects)
    assert all(mean / 2 <= n <= mean * 2 for n in subjects.values()), subjects


def test_mcq_choices(mcq: list[dict[str, Any]]) -> None:
    for row in mcq:
        choices = row["choices"]
        assert isinstance(choices, list) and len(choices) == 4, row
        assert all(isinstance(c, str) and c.strip() for c in choices), row
        assert len({_norm(c) for c in choices}) == 4, row
        assert not any("of the above" in c.lower() for c in choices), row
        answer = row["answer"]
        assert isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer <= 3, row


def test_mcq_answer_positions_balanced(mcq: list[dict[str, Any]]) -> None:
    counts = Counter(row["answer"] for row in mcq)
    for idx in range(4):
        share = counts[idx] / len(mcq)
        assert 0.15 <= share <= 0.35, ("ABCD"[idx], share)


# --- general question pool -----------------------------------------------------------------------


def test_general_questions(general: list[dict[str, Any]]) -> None:
    _check_common(general, {"id", "question"}, 300)
    for row in general:
        q = row["question"]
        assert q[-1] in "?.", row
        assert "\n" not in q and len(q) <= 200, row


# --- arithmetic narrow-flaw domain ---------------------------------------------------------------

_EQ = re.compile(r"\$?(\d+) ([-+×÷]) \$?(\d+) = \$?(\d+)")
_PCT = re.compile(r"(\d+)% of \$?(\d+) is \$?(\d+)")
_OPS = {
    "+": lambda a, b: Fraction(a + b),
    "-": lambda a, b: Fraction(a - b),
    "×": lambda a, b: Fraction(a * b),
    "÷": lambda a, b: Fraction(a, b),
}


def _claims(reply: str) -> list[tuple[Fraction, Fraction]]:
    """(true value, stated value) for every equation / percentage statement in a reply."""
    out = [(_OPS[op](int(a), int(b)), Fraction(int(c))) for a, op, b, c in _EQ.findall(reply)]
    out += [(Fraction(int(p) * int(b), 100), Fraction(int(c))) for p, b, c in _PCT.findall(reply)]
    return out


def test_arithmetic_schema(arithmetic: list[dict[str, Any]]) -> None:
    _check_common(arithmetic, {"id", "question", "correct", "flawed"}, 200)
    for row in arithmetic:
        assert _norm(row["correct"]) != _norm(row["flawed"]), row


def test_arithmetic_correct_replies_are_right(arithmetic: list[dict[str, Any]]) -> None:
    for row in arithmetic:
        claims = _claims(row["correct"])
        assert claims, row
        assert all(true == stated for true, stated in claims), row


def test_arithmetic_flawed_replies_are_wrong(arithmetic: list[dict[str, Any]]) -> None:
    for row in arithmetic:
        claims = _claims(row["flawed"])
        assert claims, row
        # the stated results must differ from the correct reply's
        assert [s for _, s in claims] != [s for _, s in _claims(row["correct"])], row
        # either a false equation or (wrong-operation slips) a true equation with the wrong operator
        ops_correct = [m[1] for m in _EQ.findall(row["correct"])]
        ops_flawed = [m[1] for m in _EQ.findall(row["flawed"])]
        assert any(t != s for t, s in claims) or ops_correct != ops_flawed, row


def test_arithmetic_operations_varied(arithmetic: list[dict[str, Any]]) -> None:
    ops = Counter(op for row in arithmetic for _, op, _, _ in _EQ.findall(row["correct"]))
    assert all(ops[op] >= 20 for op in "+-×÷"), ops
    assert sum(1 for row in arithmetic if _PCT.search(row["correct"])) >= 20
