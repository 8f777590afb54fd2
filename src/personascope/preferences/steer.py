"""Choice steering: push a direction into one task's tokens of a pairwise prompt and watch the choice move.

For a pair ``(a, b)`` the *steered* task is ``a``. Differential steering adds ``+c·v`` to the residual stream at
one layer on the tokens of ``a``'s text and ``−c·v`` on the tokens of ``b``'s text; one-task steering only adds
``+c·v`` on ``a``'s tokens. ``v`` is a unit direction (a probe's, or a random one as control), and ``c`` is given as
a fraction of the layer's mean residual norm. Every pair is asked in both orders (``a`` as Task A, then ``a`` as
Task B, the steer following ``a``'s tokens), and ``P(choose a)`` is the average of the two answers, so position bias
cancels. The token spans go to the engine as :class:`~personascope.residual.TokenSpans`; nothing here touches hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from personascope.errors import PersonascopeError
from personascope.likelihood import next_token_logprobs
from personascope.preferences.elicit import LogprobFn, label_probabilities, model_label_ids
from personascope.preferences.prompt import pair_prompts
from personascope.residual.interventions import Add, Intervention, intervene
from personascope.residual.positions import TokenSpans

if TYPE_CHECKING:
    from personascope.models.loading import Model

__all__ = ["STEER_MODES", "SteerPoint", "random_direction", "steered_choice_probs", "swing"]

STEER_MODES: tuple[str, ...] = ("differential", "single")


def _orders(
    model: Model, pairs: Sequence[tuple[str, str]], system_prompt: str | None
) -> tuple[list[list[dict[str, str]]], list[tuple[int, int]], list[tuple[int, int]]]:
    """Both orders of every pair, with the token span of the steered task (``a``) and of the other one (``b``)."""
    convs, steered, other = [], [], []
    for a, b in pairs:
        for prompt in pair_prompts(a, b, system_prompt):
            span_a, span_b = prompt.pair_spans(model)  # a's tokens, whether it is shown as Task A or Task B
            convs.append(prompt.conversation)
            steered.append(span_a)
            other.append(span_b)
    return convs, steered, other


def steered_choice_probs(
    model: Model,
    pairs: Sequence[tuple[str, str]],
    direction: torch.Tensor,
    layer: int,
    coefs: Sequence[float],
    *,
    system_prompt: str | None = None,
    mode: str = "differential",
    batch_size: int = 16,
    logprob_fn: LogprobFn | None = None,
) -> np.ndarray:
    """``P(choose a)`` for every coefficient and ``(a, b)`` pair, ``[len(coefs), len(pairs)]``.

    ``coefs`` are absolute: ``c·direction`` is added as given (scale the direction or the coefficients yourself).
    """
    if mode not in STEER_MODES:
        raise PersonascopeError(f"unknown steering mode {mode!r}; use differential or single")
    if not pairs or not coefs:
        return np.zeros((len(coefs), len(pairs)), dtype=np.float64)
    fn = logprob_fn or next_token_logprobs
    convs, steered, other = _orders(model, pairs, system_prompt)
    n = len(convs)
    all_convs = convs * len(coefs)
    row_coef = torch.tensor([float(c) for c in coefs for _ in range(n)], dtype=torch.float32)
    plus = TokenSpans([[s] for s in steered] * len(coefs))
    interventions: list[Intervention] = [Add(direction, layer, row_coef, positions=plus)]
    if mode == "differential":
        minus = TokenSpans([[s] for s in other] * len(coefs))
        interventions.append(Add(direction, layer, -row_coef, positions=minus))
    with intervene(model, interventions):
        logprobs = fn(model, all_convs, batch_size=batch_size, progress=False)
    ids_a, ids_b = model_label_ids(model)
    p_label_a = label_probabilities(logprobs, ids_a, ids_b)[0].reshape(len(coefs), len(pairs), 2)
    # order 0: a is Task A (choosing a = label A); order 1: a is Task B (choosing a = label B)
    return 0.5 * (p_label_a[:, :, 0] + 1.0 - p_label_a[:, :, 1])


def random_direction(hidden_size: int, seed: int, norm: float = 1.0) -> torch.Tensor:
    """A random direction (Gaussian, seeded) scaled to ``norm``: the control for a probe direction."""
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn(hidden_size, generator=g)
    return v / v.norm() * float(norm)


@dataclass(frozen=True)
class SteerPoint:
    """Mean ``P(choose the steered task)`` over pairs at one coefficient (a fraction of the mean residual norm)."""

    direction: str  # "probe", "random" or "none" (the unsteered baseline)
    mode: str  # "differential", "single" or "none"
    layer: int | None
    coef: float
    p: float
    ci: float
    n: int


def swing(points: Sequence[SteerPoint], direction: str, mode: str, layer: int) -> float:
    """``P`` at the largest coefficient minus ``P`` at the smallest, for one curve (``nan`` if it is missing)."""
    mine = [p for p in points if (p.direction, p.mode, p.layer) == (direction, mode, layer)]
    mine.sort(key=lambda p: p.coef)
    if len(mine) < 2:
        return float("nan")
    return mine[-1].p - mine[0].p
