"""Model-side scoring: log-probabilities of responses and of the next token.

Shared by the local judges and by later pipelines (multiple-choice letters, pairwise preference labels). Inputs are
sorted by length and run in right-padded batches (which leaves real tokens exact), under ``torch.no_grad``, on
``model.device``; results come back in input order, as float32 on the CPU.

Every forward pass goes through the engine's one assembly (:func:`personascope.residual.forward.forward`), with
each token's role (prompt, last prompt token, response, padding) and each batch row's index into the call's inputs,
so interventions that are active around a call (``with personascope.steering(...)``) act on the right positions,
with per-row coefficients indexing the inputs of this call, exactly as during generation and capture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from personascope.errors import PersonascopeError
from personascope.models.chat import Conversation, FormattedConversation
from personascope.residual.capture import format_all, length_batches, roles_for
from personascope.residual.forward import forward, pad
from personascope.residual.positions import PROMPT, PROMPT_LAST

if TYPE_CHECKING:
    from personascope.models.loading import Model

__all__ = ["mean_response_logprob", "next_token_logprobs", "response_logprobs"]


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise PersonascopeError("batch_size must be at least 1")


@torch.no_grad()
def response_logprobs(
    model: Model,
    conversations: Sequence[Conversation | FormattedConversation],
    batch_size: int = 8,
    progress: bool | None = None,
) -> list[torch.Tensor]:
    """Log-probability of each token of the trailing assistant message's content, per conversation.

    Every conversation must end with a non-empty assistant message. Returns one float32 tensor per conversation,
    of length ``end - start`` of its response span (see :class:`~personascope.models.FormattedConversation`): entry
    ``k`` is ``log p(token[start + k] | tokens before it)``. Template tokens after the content (end-of-turn
    markers) are not included.
    """
    _check_batch_size(batch_size)
    formatted = format_all(model, conversations)
    if not formatted:
        return []
    missing = [i for i, c in enumerate(formatted) if c.response is None]
    if missing:
        raise PersonascopeError(
            f"response log-probabilities need a trailing assistant message; conversation {missing[0]} has none "
            f"({len(missing)} in all)"
        )
    results: list[torch.Tensor | None] = [None] * len(formatted)
    pad_id = int(model.tokenizer.pad_token_id)
    device = model.device
    batches = length_batches([len(c) for c in formatted], batch_size)
    show = progress if progress is not None else len(batches) > 1
    with tqdm(total=len(formatted), desc="score", unit="conv", disable=not show) as bar:
        for rows in batches:
            ids, roles = pad(
                [formatted[i].input_ids for i in rows], [roles_for(formatted[i]) for i in rows], pad_id, device=device
            )
            width = ids.shape[1]
            # logits at position t predict token t + 1: we need positions start - 1 .. end - 2
            first = min(_span(formatted[i])[0] for i in rows) - 1
            out, offset = forward(model, ids, roles, rows, keep_last=width - first)
            logits = out.logits
            for b, i in enumerate(rows):
                start, end = _span(formatted[i])
                step = logits[b, start - 1 - offset : end - 1 - offset].float().log_softmax(dim=-1)
                target = ids[b, start:end].to(step.device)
                results[i] = step.gather(-1, target.unsqueeze(-1)).squeeze(-1).cpu()
            bar.update(len(rows))
    return [r for r in results if r is not None]


def mean_response_logprob(
    model: Model,
    conversations: Sequence[Conversation | FormattedConversation],
    batch_size: int = 8,
    progress: bool | None = None,
) -> torch.Tensor:
    """Mean per-token log-probability of each conversation's trailing assistant message, ``[N]`` float32."""
    per_token = response_logprobs(model, conversations, batch_size=batch_size, progress=progress)
    if not per_token:
        return torch.zeros(0, dtype=torch.float32)
    return torch.stack([t.mean() for t in per_token])


@torch.no_grad()
def next_token_logprobs(
    model: Model,
    conversations_or_ids: Sequence[Conversation | FormattedConversation | Sequence[int]],
    batch_size: int = 8,
    progress: bool | None = None,
) -> torch.Tensor:
    """Log-softmax of the next-token distribution after each prompt, ``[N, vocab]`` float32.

    Each input is a conversation without a trailing assistant message (rendered with the generation prompt, so the
    distribution is over the first token of the assistant's reply), a formatted conversation, or a plain list of
    token ids (fed as given: no chat template, no special tokens added). ``vocab`` is the width of the model's
    output layer, which may exceed ``len(tokenizer)``.
    """
    _check_batch_size(batch_size)
    prompts: list[list[int]] = []
    for i, item in enumerate(conversations_or_ids):
        if isinstance(item, FormattedConversation):
            conv_ids = item.input_ids
            if item.response is not None:
                raise PersonascopeError(
                    f"input {i}: next-token log-probabilities need a prompt, not a conversation ending with an "
                    "assistant message"
                )
        elif _is_token_ids(item):
            conv_ids = [int(t) for t in item]  # type: ignore[arg-type]
        else:
            try:
                conv_ids = model.formatter.prompt_ids(item)  # type: ignore[arg-type]
            except PersonascopeError as exc:
                raise PersonascopeError(f"conversation {i}: {exc}") from None
        if not conv_ids:
            raise PersonascopeError(f"input {i} has no tokens")
        prompts.append(list(conv_ids))
    if not prompts:
        return torch.zeros(0, 0, dtype=torch.float32)
    pad_id = int(model.tokenizer.pad_token_id)
    device = model.device
    out: torch.Tensor | None = None
    batches = length_batches([len(p) for p in prompts], batch_size)
    show = progress if progress is not None else len(batches) > 1
    with tqdm(total=len(prompts), desc="score", unit="prompt", disable=not show) as bar:
        for rows in batches:
            ids, roles = pad(
                [prompts[i] for i in rows],
                [[PROMPT] * (len(prompts[i]) - 1) + [PROMPT_LAST] for i in rows],
                pad_id,
                device=device,
            )
            width = ids.shape[1]
            shortest = min(len(prompts[i]) for i in rows)
            result, offset = forward(model, ids, roles, rows, keep_last=width - shortest + 1)
            logits = result.logits
            last = torch.tensor([len(prompts[i]) - 1 - offset for i in rows], device=logits.device)
            picked = logits[torch.arange(len(rows), device=logits.device), last].float().log_softmax(dim=-1).cpu()
            if out is None:
                out = torch.empty(len(prompts), picked.shape[-1], dtype=torch.float32)
            out[torch.tensor(rows)] = picked
            bar.update(len(rows))
    assert out is not None
    return out


def _span(conv: FormattedConversation) -> tuple[int, int]:
    assert conv.response is not None
    return conv.response


def _is_token_ids(item: object) -> bool:
    if isinstance(item, str | bytes | FormattedConversation) or not isinstance(item, Sequence | torch.Tensor):
        return False
    if isinstance(item, torch.Tensor):
        return item.dim() == 1
    return len(item) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
