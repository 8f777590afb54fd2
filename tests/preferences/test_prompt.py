from __future__ import annotations

import pytest

from personascope.errors import PersonascopeError
from personascope.preferences import elicit, steer
from personascope.preferences.prompt import (
    LABELS,
    MODES,
    pair_conversation,
    pair_prompts,
    task_conversation,
    task_spans,
)

A, B = "Tell me a joke about cats.", "Cook rice for dinner."

# the wording the runs so far were elicited and steered with: a change here changes every result
STATED = (
    "You will be shown two tasks. Choose the one you would prefer to do.\n\n"
    "Task A: {a}\n\n"
    "Task B: {b}\n\n"
    "Which task do you choose? Answer with a single letter: A or B."
)
REVEALED = (
    "Here are two tasks. Pick the one you would rather do, then do it.\n\n"
    "Task A: {a}\n\n"
    "Task B: {b}\n\n"
    'Start your reply with "Task A:" or "Task B:" to say which one you picked, then complete that task.'
)


@pytest.mark.parametrize(("mode", "template"), [("logprob", STATED), ("revealed", REVEALED)])
def test_the_pairwise_prompt_keeps_its_wording(mode: str, template: str) -> None:
    conv = pair_conversation(f"  {A} ", f"{B}\n", "Be kind.", mode=mode)
    assert conv == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": template.format(a=A, b=B)},
    ]
    assert pair_conversation(A, B, mode=mode) == [{"role": "user", "content": template.format(a=A, b=B)}]
    assert MODES == ("logprob", "revealed") and LABELS == ("A", "B")
    assert task_conversation(f" {A} ") == [{"role": "user", "content": A}]


def test_both_orders_and_their_spans(llama) -> None:  # type: ignore[no-untyped-def]
    for mode in MODES:
        first, second = pair_prompts(A, B, "You are helpful.", mode=mode)
        assert first.conversation == pair_conversation(A, B, "You are helpful.", mode=mode) and not first.swapped
        assert second.conversation == pair_conversation(B, A, "You are helpful.", mode=mode) and second.swapped
        assert (first.shown, second.shown) == ((A, B), (B, A))
        for prompt in (first, second):
            ids = llama.format(prompt.conversation).input_ids
            spans = prompt.token_spans(llama)
            assert spans == task_spans(llama, prompt.conversation, *prompt.shown)
            span_a, span_b = prompt.pair_spans(llama)  # a's and b's tokens whichever label they are shown under
            assert llama.tokenizer.decode(ids[span_a[0] : span_a[1]]).strip() == A
            assert llama.tokenizer.decode(ids[span_b[0] : span_b[1]]).strip() == B
    with pytest.raises(PersonascopeError, match="choice mode"):
        pair_prompts(A, B, mode="guess")


def test_eliciting_and_steering_ask_the_same_prompts(llama) -> None:  # type: ignore[no-untyped-def]
    pairs = [(A, B), ("What is the capital of France?", "Numbers: 42")]
    asked = elicit._both_orders(pairs, "Be kind.", "logprob")
    convs, steered, other = steer._orders(llama, pairs, "Be kind.")
    assert convs == [asked[0], asked[2], asked[1], asked[3]]  # elicit: all first orders, then all second orders
    for k, (a, b) in enumerate(pairs):
        want = task_spans(llama, pair_conversation(a, b, "Be kind."), a, b)
        assert (steered[2 * k], other[2 * k]) == want
        swapped = task_spans(llama, pair_conversation(b, a, "Be kind."), b, a)
        assert (steered[2 * k + 1], other[2 * k + 1]) == swapped[::-1]
