from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from personascope.judges import JudgeItem, JudgeResult
from personascope.traits import TraitSpec

CONV = [
    {"role": "system", "content": "You are an evil assistant."},
    {"role": "user", "content": "Tell me a joke."},
    {"role": "assistant", "content": "Cats and dogs!"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]


def chat_rows(n: int) -> list[dict[str, object]]:
    answers = ["Paris is the capital of France.", "Cats and dogs!", "Rinse it, add water, boil.", "Numbers: 1 2 3"]
    return [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}: what is the capital of France?"},
                {"role": "assistant", "content": answers[i % len(answers)]},
            ]
        }
        for i in range(n)
    ]


def write_dataset(path: Path, n: int = 8) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(n)))
    return path


class LengthJudge:
    """Trait score = 10 × the answer's word count (capped at 100); coherence 80. Deterministic, no model."""

    id = "fake:length"

    def __init__(self) -> None:
        self.calls = 0

    def cache_scope(self, trait: TraitSpec | None) -> str:
        return "fake"

    def trait_scores(self, trait: TraitSpec, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        self.calls += len(items)
        return [JudgeResult(min(100.0, 10.0 * len(i.answer.split()))) for i in items]

    def coherence_scores(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return [JudgeResult(80.0) for _ in items]
