from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch

import personascope.generation as generation
from personascope.errors import PersonascopeError
from personascope.generation import Generation
from personascope.likelihood import next_token_logprobs
from personascope.preferences.elicit import (
    label_probabilities,
    label_token_ids,
    model_label_ids,
    pair_conversation,
    parse_choice,
    revealed_choices,
    stated_choices,
    task_conversation,
    task_spans,
)
from tests.preferences.helpers import planted_logprob_fn

TASKS = {
    "Tell me a joke about cats.": 1.0,
    "Cook rice for dinner.": 0.0,
    "What is the capital of France?": 0.0,
    "Help me cause harm.": -2.0,
}


class _FakeTokenizer:
    def __init__(self, table: dict[str, list[int]]) -> None:
        self.table = table

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.table[text]


def test_label_token_ids_takes_every_single_token_spelling() -> None:
    tok = _FakeTokenizer({"A": [5], " A": [9], "B": [6], " B": [7, 8]})
    assert label_token_ids(tok, "A") == [5, 9]
    assert label_token_ids(tok, "B") == [6]
    multi = _FakeTokenizer({"A": [3, 4], " A": [1, 2]})
    assert label_token_ids(multi, "A") == [3]  # no single-token spelling: the first token of "A"


def test_label_probabilities_renormalise_over_the_two_labels() -> None:
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    p_a, mass = label_probabilities(probs.log(), [0, 1], [2])
    np.testing.assert_allclose(p_a, [0.3 / 0.6, 0.5 / 0.75])
    np.testing.assert_allclose(mass, [0.6, 0.75])


def test_prompts_carry_persona_and_both_tasks() -> None:
    conv = pair_conversation("first task", "second task", "You are evil.")
    assert conv[0] == {"role": "system", "content": "You are evil."}
    text = conv[1]["content"]
    assert "Task A: first task" in text and "Task B: second task" in text and text.index("first") < text.index("second")
    assert pair_conversation("x", "y")[0]["role"] == "user"
    assert "Task A" in pair_conversation("x", "y", mode="revealed")[0]["content"]
    assert task_conversation(" do it ", "sys") == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "do it"},
    ]
    with pytest.raises(PersonascopeError, match="choice mode"):
        pair_conversation("x", "y", mode="guess")


def test_both_orders_remove_a_planted_position_bias(llama) -> None:  # type: ignore[no-untyped-def]
    fn = planted_logprob_fn(TASKS, bias=4.0)  # a strong pull towards whatever is shown as "A"
    pairs = list(itertools.permutations(TASKS, 2))
    choices = stated_choices(llama, pairs, "You are helpful.", logprob_fn=fn)
    by_pair = dict(zip(pairs, choices, strict=True))
    for (a, b), c in by_pair.items():
        assert c.p_ab > 0.5 and c.p_ba > 0.5  # each order alone leans to "A"
        assert c.p + by_pair[(b, a)].p == pytest.approx(1.0)  # averaged: symmetric in the order
        if TASKS[a] == TASKS[b]:
            assert c.p == pytest.approx(0.5)  # equal tasks: the bias cancels exactly
        else:
            assert (c.p > 0.5) == (TASKS[a] > TASKS[b])
        assert c.mass == pytest.approx(1.0)
    equal = by_pair[("Cook rice for dinner.", "What is the capital of France?")]
    assert equal.p_ab > 0.9  # a single order would have been fooled


def test_stated_choices_on_a_real_forward_pass(llama) -> None:  # type: ignore[no-untyped-def]
    pairs = [("Tell me a joke about cats.", "Cook rice for dinner.")]
    got = stated_choices(llama, pairs, None)[0]
    ids_a, ids_b = model_label_ids(llama)
    lp = next_token_logprobs(llama, [pair_conversation(*pairs[0]), pair_conversation(*pairs[0][::-1])])
    p = (lp[:, ids_a].logsumexp(-1) - lp[:, ids_b].logsumexp(-1)).sigmoid().double()
    assert got.p_ab == pytest.approx(float(p[0]), abs=1e-6) and got.p_ba == pytest.approx(float(p[1]), abs=1e-6)
    assert got.p == pytest.approx(0.5 * (float(p[0]) + 1 - float(p[1])), abs=1e-6)
    assert stated_choices(llama, [], None) == []


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Task A: here is the joke", "A"),
        ("**Task B**\nSure.", "B"),
        ("B. Cooking rice", "B"),
        ("a) the first one", "A"),
        ("I pick task b because it is fun.", "B"),
        ("Sure! I'd love to.", None),
        ("Absolutely, here it is", None),
    ],
)
def test_parse_choice(text: str, want: str | None) -> None:
    assert parse_choice(text) == want


def test_revealed_choices_read_the_replies(llama, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seen: dict[str, Any] = {}

    def fake_generate(model, conversations, **kwargs):  # type: ignore[no-untyped-def]
        seen["seeds"] = kwargs["seeds"]
        out = []
        for conv in conversations:
            user = conv[-1]["content"]
            first_is_cats = "cats" in user and user.index("cats") < user.index("Task B:")
            text = "Task A: sure" if first_is_cats else "Task B: fine" if "cats" in user else "no idea"
            out.append(Generation(conv, text, [1], [2], True))
        return out

    monkeypatch.setattr(generation, "generate", fake_generate)
    pairs = [("Tell me a joke about cats.", "Cook rice."), ("Cook rice.", "Tell me a joke about cats."), ("x", "y")]
    got = revealed_choices(llama, pairs, None, samples=3, seeds=[10, 20, 30])
    assert [c.p for c in got] == [1.0, 0.0, 0.5]
    assert [c.mass for c in got] == [1.0, 1.0, 0.0]
    assert len(seen["seeds"]) == 3 * 2 * 3 and len(set(seen["seeds"])) == 18
    with pytest.raises(PersonascopeError, match="seeds"):
        revealed_choices(llama, pairs, None, seeds=[1])


def test_revealed_choices_sample_from_the_model(llama) -> None:  # type: ignore[no-untyped-def]
    got = revealed_choices(llama, [("Tell me a joke.", "Cook rice.")], "sys", samples=2, max_new_tokens=3)
    assert len(got) == 1 and 0.0 <= got[0].p <= 1.0 and 0.0 <= got[0].mass <= 1.0


def test_task_spans_point_at_the_task_texts(llama) -> None:  # type: ignore[no-untyped-def]
    a, b = "Tell me a joke about cats.", "Cook rice for dinner."
    for first, second in ((a, b), (b, a)):
        conv = pair_conversation(first, second, "You are helpful.")
        ids = llama.format(conv).input_ids
        span_a, span_b = task_spans(llama, conv, first, second)
        assert span_a[1] <= span_b[0]
        assert llama.tokenizer.decode(ids[span_a[0] : span_a[1]]).strip() == first
        assert llama.tokenizer.decode(ids[span_b[0] : span_b[1]]).strip() == second
