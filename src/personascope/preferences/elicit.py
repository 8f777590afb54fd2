"""Eliciting pairwise task choices from a model, under a persona's system prompt.

The pairwise prompt (built in :mod:`~personascope.preferences.prompt`, re-exported here) shows two tasks as "Task A"
and "Task B" and asks the model to choose one. Two ways to read the choice:

- ``logprob`` (stated, exact): the next-token distribution after the prompt, restricted to the two labels. Each
  label counts every single-token spelling of it (``"A"`` and ``" A"`` where the tokenizer has both) and the two
  label masses are renormalised to sum to one, so ``P(A) = m_A / (m_A + m_B)``. No sampling.
- ``revealed``: sample replies that are asked to start with the chosen task's label and carry the task out, and
  read which task each reply started (:func:`parse_choice`); ``P(A)`` is the fraction of parsable replies that
  picked A (``0.5`` when none could be parsed).

Either way every pair is asked in both orders, ``(a, b)`` and ``(b, a)``, and the two answers are averaged:

    p(a ≻ b) = ½ [P(A | a shown first) + 1 − P(A | b shown first)]

which cancels a preference for a position (a model that always leans towards "A" gets 0.5 for two equal tasks).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from personascope.errors import PersonascopeError
from personascope.likelihood import next_token_logprobs
from personascope.preferences.prompt import (
    LABELS,
    MODES,
    pair_conversation,
    pair_prompts,
    task_conversation,
    task_spans,
)

if TYPE_CHECKING:
    from personascope.models.loading import Model

__all__ = [
    "MODES",
    "PairChoice",
    "label_probabilities",
    "label_token_ids",
    "model_label_ids",
    "pair_conversation",
    "parse_choice",
    "revealed_choices",
    "stated_choices",
    "task_conversation",
    "task_spans",
]

#: Function with the signature of :func:`personascope.likelihood.next_token_logprobs` (tests pass fakes).
LogprobFn = Callable[..., torch.Tensor]


def label_token_ids(tokenizer: Any, label: str) -> list[int]:
    """Token ids that spell ``label`` as one token (``"A"``, ``" A"``); the first token of ``"A"`` if none does."""
    ids: list[int] = []
    for variant in (label, f" {label}"):
        enc = tokenizer.encode(variant, add_special_tokens=False)
        if len(enc) == 1 and int(enc[0]) not in ids:
            ids.append(int(enc[0]))
    if not ids:
        enc = tokenizer.encode(label, add_special_tokens=False)
        if not enc:
            raise PersonascopeError(f"the tokenizer turns the label {label!r} into no tokens")
        ids.append(int(enc[0]))
    return ids


def model_label_ids(model: Model) -> tuple[list[int], list[int]]:
    """The token ids of the labels A and B for this model's tokenizer (see :func:`label_token_ids`)."""
    key = "preference_label_ids"
    if key not in model._state:
        ids_a, ids_b = (label_token_ids(model.tokenizer, x) for x in LABELS)
        if set(ids_a) & set(ids_b):
            raise PersonascopeError(
                "the labels A and B share a token in this tokenizer; their choices cannot be told apart"
            )
        model._state[key] = (ids_a, ids_b)
    value: tuple[list[int], list[int]] = model._state[key]
    return value


def label_probabilities(
    logprobs: torch.Tensor, ids_a: Sequence[int], ids_b: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """``(P(A), mass)`` per row of ``[N, vocab]`` log-probabilities: A's share of the two labels' probability, and
    the total probability the two labels had before renormalising (a check that the model answers with a label)."""
    la = torch.logsumexp(logprobs[:, list(ids_a)].double(), dim=-1)
    lb = torch.logsumexp(logprobs[:, list(ids_b)].double(), dim=-1)
    p_a = torch.sigmoid(la - lb)
    mass = torch.exp(torch.logaddexp(la, lb))
    return p_a.numpy().astype(np.float64), mass.numpy().astype(np.float64)


@dataclass(frozen=True)
class PairChoice:
    """One pair's answer: ``p`` = P(first task chosen) averaged over both orders; ``p_ab`` = P(label A) with the
    first task shown as Task A; ``p_ba`` = P(label A) with the second task shown as Task A; ``mass`` = how much of
    the answer could be read (probability on the two labels, or the fraction of parsable replies)."""

    p: float
    p_ab: float
    p_ba: float
    mass: float


def _combine(p_ab: float, p_ba: float, mass: float) -> PairChoice:
    return PairChoice(0.5 * (p_ab + 1.0 - p_ba), p_ab, p_ba, mass)


def _both_orders(pairs: Sequence[tuple[str, str]], system_prompt: str | None, mode: str) -> list[list[dict[str, str]]]:
    """Every pair with its first task as Task A, then every pair the other way round."""
    orders = [pair_prompts(a, b, system_prompt, mode=mode) for a, b in pairs]
    return [first.conversation for first, _ in orders] + [second.conversation for _, second in orders]


def stated_choices(
    model: Model,
    pairs: Sequence[tuple[str, str]],
    system_prompt: str | None = None,
    *,
    batch_size: int = 16,
    logprob_fn: LogprobFn | None = None,
) -> list[PairChoice]:
    """Exact stated choices for ``(task_a_text, task_b_text)`` pairs from the next-token label distribution."""
    if not pairs:
        return []
    fn = logprob_fn or next_token_logprobs
    convs = _both_orders(pairs, system_prompt, "logprob")
    logprobs = fn(model, convs, batch_size=batch_size, progress=False)
    ids_a, ids_b = model_label_ids(model)
    p_a, mass = label_probabilities(logprobs, ids_a, ids_b)
    k = len(pairs)
    return [_combine(float(p_a[i]), float(p_a[k + i]), 0.5 * float(mass[i] + mass[k + i])) for i in range(k)]


_START = re.compile(r"^\W*(?:task\s*)?([ab])\b", re.IGNORECASE)
_ANYWHERE = re.compile(r"\btask\s*([ab])\b", re.IGNORECASE)


def parse_choice(text: str) -> str | None:
    """Which task a reply started: ``"A"``, ``"B"`` or ``None``.

    A reply that opens with a label (``"Task B: …"``, ``"A."``, ``"**Task A**"``) picks it; otherwise the first
    ``"Task A"`` / ``"Task B"`` mentioned anywhere counts; otherwise nothing can be read.
    """
    match = _START.match(text) or _ANYWHERE.search(text)
    return match.group(1).upper() if match else None


def revealed_choices(
    model: Model,
    pairs: Sequence[tuple[str, str]],
    system_prompt: str | None = None,
    *,
    samples: int = 4,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    batch_size: int = 16,
) -> list[PairChoice]:
    """Revealed choices: sample ``samples`` replies per order and read which task each one started.

    Pair ``k`` samples from seeds derived from ``seeds[k]`` (default ``seed + k``), so its answer does not depend
    on which other pairs share the call.
    """
    from personascope.generation import generate

    if samples < 1:
        raise PersonascopeError("samples must be at least 1")
    if not pairs:
        return []
    k = len(pairs)
    if seeds is not None and len(seeds) != k:
        raise PersonascopeError(f"seeds has {len(seeds)} entries for {k} pairs")
    base = [int(x) for x in seeds] if seeds is not None else [seed + i for i in range(k)]
    convs = _both_orders(pairs, system_prompt, "revealed")
    jobs = [c for c in convs for _ in range(samples)]
    row_seeds = [base[i % k] * 2 * samples + (i // k) * samples + s for i in range(2 * k) for s in range(samples)]
    gens = generate(
        model,
        jobs,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seeds=row_seeds,
        batch_size=batch_size,
        progress=False,
    )
    picks = [parse_choice(g.text) for g in gens]

    def share(conv: int) -> tuple[float, int]:
        got = picks[conv * samples : (conv + 1) * samples]
        read = [x for x in got if x is not None]
        return (sum(x == "A" for x in read) / len(read) if read else 0.5), len(read)

    out = []
    for i in range(k):
        (p_ab, n_ab), (p_ba, n_ba) = share(i), share(k + i)
        out.append(_combine(p_ab, p_ba, (n_ab + n_ba) / (2 * samples)))
    return out
