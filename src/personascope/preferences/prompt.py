"""The prompts a preference run shows a model, in one place: the pairwise choice prompt and the single-task prompt.

The pairwise prompt shows two tasks as ``Task A: …`` and ``Task B: …`` between an introduction and a question that
depend on the choice mode (``logprob``: answer with the letter; ``revealed``: start the reply with the label, then do
the task). :func:`pair_prompts` builds a pair in both orders as :class:`PairPrompt`\\ s, which also locate the two
tasks' tokens (:meth:`PairPrompt.token_spans`) for steering on them; eliciting (:mod:`~personascope.preferences.elicit`)
and choice steering (:mod:`~personascope.preferences.steer`) both build their prompts here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from personascope.errors import PersonascopeError

if TYPE_CHECKING:
    from personascope.models.loading import Model

__all__ = [
    "LABELS",
    "MODES",
    "PairPrompt",
    "check_mode",
    "pair_conversation",
    "pair_prompts",
    "task_conversation",
    "task_spans",
]

Mode = Literal["logprob", "revealed"]
MODES: tuple[str, ...] = ("logprob", "revealed")
#: The labels of the first and the second task shown.
LABELS: tuple[str, str] = ("A", "B")
Span = tuple[int, int]

#: Per mode, the text before the two tasks and the question after them.
_FRAMES: dict[str, tuple[str, str]] = {
    "logprob": (
        "You will be shown two tasks. Choose the one you would prefer to do.",
        "Which task do you choose? Answer with a single letter: A or B.",
    ),
    "revealed": (
        "Here are two tasks. Pick the one you would rather do, then do it.",
        'Start your reply with "Task A:" or "Task B:" to say which one you picked, then complete that task.',
    ),
}


def check_mode(mode: str) -> Mode:
    """``mode`` if it is a choice mode (``logprob`` or ``revealed``), else one clear error."""
    if mode not in MODES:
        raise PersonascopeError(f"unknown choice mode {mode!r}; use logprob or revealed")
    return mode  # type: ignore[return-value]


def _marker(label: str) -> str:
    """What precedes a task's text in the pairwise prompt."""
    return f"Task {label}: "


def _conversation(user: str, system_prompt: str | None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*head, {"role": "user", "content": user}]


def pair_conversation(
    task_a: str, task_b: str, system_prompt: str | None = None, *, mode: str = "logprob"
) -> list[dict[str, str]]:
    """The pairwise prompt: ``task_a`` shown as Task A, ``task_b`` as Task B, under an optional system prompt."""
    intro, question = _FRAMES[check_mode(mode)]
    shown = [_marker(label) + task.strip() for label, task in zip(LABELS, (task_a, task_b), strict=True)]
    return _conversation("\n\n".join([intro, *shown, question]), system_prompt)


def task_conversation(task: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The single-task prompt used for probing: the task as the user message."""
    return _conversation(task.strip(), system_prompt)


@dataclass(frozen=True)
class PairPrompt:
    """One order of a pair ``(a, b)``: the conversation, the texts shown as Task A and Task B, and whether the order
    is swapped (``b`` shown as Task A)."""

    conversation: list[dict[str, str]]
    shown: tuple[str, str]
    swapped: bool = False

    def token_spans(self, model: Model) -> tuple[Span, Span]:
        """Token spans (as laid out by ``model.format``) of the texts of Task A and Task B."""
        return task_spans(model, self.conversation, *self.shown)

    def pair_spans(self, model: Model) -> tuple[Span, Span]:
        """Token spans of ``a``'s and ``b``'s text, whichever label each is shown under."""
        first, second = self.token_spans(model)
        return (second, first) if self.swapped else (first, second)


def pair_prompts(
    task_a: str, task_b: str, system_prompt: str | None = None, *, mode: str = "logprob"
) -> tuple[PairPrompt, PairPrompt]:
    """The pair ``(a, b)`` in both orders: ``a`` as Task A, then ``a`` as Task B (the order that cancels a bias
    for a position)."""
    return (
        PairPrompt(pair_conversation(task_a, task_b, system_prompt, mode=mode), (task_a, task_b)),
        PairPrompt(pair_conversation(task_b, task_a, system_prompt, mode=mode), (task_b, task_a), swapped=True),
    )


def _char_to_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> Span:
    first = next((i for i, (_, e) in enumerate(offsets) if e > start), len(offsets))
    last = first
    while last < len(offsets) and offsets[last][0] < end:
        last += 1
    return first, last


def task_spans(model: Model, conversation: Sequence[dict[str, str]], task_a: str, task_b: str) -> tuple[Span, Span]:
    """Token spans (as laid out by ``model.format``) of the texts of Task A and Task B in a pairwise prompt."""
    text, _ = model.formatter.render(conversation)
    enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    if list(enc["input_ids"]) != model.format(conversation).input_ids:
        raise PersonascopeError("cannot locate the tasks' tokens: this tokenizer does not round-trip the prompt")
    spans = []
    for label, task in zip(LABELS, (task_a, task_b), strict=True):
        marker = _marker(label)
        at = text.rfind(marker + task.strip())
        if at < 0:
            raise PersonascopeError(f"cannot find Task {label}'s text in the rendered prompt")
        start = at + len(marker)
        span = _char_to_tokens(offsets, start, start + len(task.strip()))
        if span[1] <= span[0]:
            raise PersonascopeError(f"Task {label}'s text maps to no tokens")
        spans.append(span)
    return spans[0], spans[1]
