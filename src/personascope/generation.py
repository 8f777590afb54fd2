"""Batched sampling with interventions.

Our own decoding loop (rather than ``model.generate``) so that the engine always knows which tokens are prompt and
which are generated: prompts are left-padded with explicit position ids, the first pass fills the KV cache, and each
step feeds one token per row whose role is "response". Every conversation samples from its own generator seeded
with ``seed + index``, so results do not depend on batch size or order.

Two optional extras cost nothing when unused: ``top_logprobs=k`` records, for every generated token, its
log-probability and the ``k`` most likely tokens under the log-softmax of the raw logits (before temperature and
top-p, after any interventions); ``stop=[...]`` ends a row as soon as its decoded reply contains one of the strings
(the reply text is cut before it).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from personascope.errors import PersonascopeError
from personascope.models.chat import Conversation, validate_conversation
from personascope.residual.capture import length_batches
from personascope.residual.forward import attention_mask, forward, output_cache, pad
from personascope.residual.interventions import Intervention, intervene
from personascope.residual.positions import PROMPT, PROMPT_LAST, RESPONSE

if TYPE_CHECKING:
    from personascope.models.loading import Model


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one generated step, from the log-softmax of the raw logits (before temperature/top-p).

    ``token_id``/``logprob``: the token that was chosen; ``top``: the ``k`` most likely ``(token_id, logprob)``
    pairs, most likely first (the chosen token need not be among them when sampling).
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Generation:
    """One sampled reply. ``prompt_ids + response_ids`` is the full sequence; the response span is
    ``[len(prompt_ids), len(prompt_ids) + len(response_ids))``. ``finished`` is True when an end token stopped it
    (the end token is in ``response_ids`` but not in ``text``). ``stop`` is the stop string that ended it, if any
    (its tokens are in ``response_ids``; ``text`` is cut before it). ``logprobs`` (only with ``top_logprobs > 0``)
    has one entry per token of ``response_ids``."""

    conversation: list[dict[str, str]]
    text: str
    prompt_ids: list[int]
    response_ids: list[int]
    finished: bool
    logprobs: list[TokenLogprobs] | None = None
    stop: str | None = None

    @property
    def response_span(self) -> tuple[int, int]:
        return len(self.prompt_ids), len(self.prompt_ids) + len(self.response_ids)

    def as_conversation(self) -> list[dict[str, str]]:
        """The prompt conversation with the reply appended as an assistant message."""
        return [*self.conversation, {"role": "assistant", "content": self.text}]


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gens: list[torch.Generator]) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        cumulative = sorted_p.cumsum(dim=-1)
        drop = cumulative - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    out = [torch.multinomial(probs[b].cpu(), 1, generator=gens[b]) for b in range(probs.shape[0])]
    return torch.cat(out).to(logits.device)


@torch.no_grad()
def generate(
    model: Model,
    conversations: Sequence[Conversation],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    interventions: Sequence[Intervention] = (),
    batch_size: int = 16,
    use_cache: bool = True,
    progress: bool | None = None,
    top_logprobs: int = 0,
    stop: Sequence[str] = (),
) -> list[Generation]:
    """Sample a reply to each conversation (``temperature=0`` is greedy), in input order.

    ``interventions`` are applied for the whole call; per-row coefficients index conversations in this call.
    Conversation ``i`` samples with seed ``seeds[i]`` when given, else ``seed + i``.
    ``use_cache=False`` recomputes the whole sequence at every step (slow; used to check the cached path).
    ``top_logprobs=k > 0`` fills :attr:`Generation.logprobs` (the chosen token and the top ``k`` per step).
    ``stop`` strings end a reply once its decoded text contains one (see :attr:`Generation.stop`).
    """
    if max_new_tokens < 1:
        raise PersonascopeError("max_new_tokens must be at least 1")
    if not 0 < top_p <= 1:
        raise PersonascopeError("top_p must be in (0, 1]")
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or top_logprobs < 0:
        raise PersonascopeError(f"top_logprobs must be a non-negative integer, got {top_logprobs!r}")
    if isinstance(stop, str):
        stop = [stop]
    stops = tuple(stop)
    if any(not isinstance(x, str) or not x for x in stops):
        raise PersonascopeError("stop strings must be non-empty strings")
    if not conversations:
        raise PersonascopeError("no conversations to generate from")
    if seeds is not None and len(seeds) != len(conversations):
        raise PersonascopeError(f"seeds has {len(seeds)} entries for {len(conversations)} conversations")
    row_seeds = [int(x) for x in seeds] if seeds is not None else [seed + i for i in range(len(conversations))]
    convs = [validate_conversation(c, f"conversation {i}") for i, c in enumerate(conversations)]
    prompts = []
    for i, c in enumerate(convs):
        try:
            prompts.append(model.formatter.prompt_ids(c))
        except PersonascopeError as exc:
            raise PersonascopeError(f"conversation {i}: {exc}") from None
    results: list[Generation | None] = [None] * len(convs)
    batches = length_batches([len(p) for p in prompts], batch_size)
    show = progress if progress is not None else len(batches) > 1
    ctx = intervene(model, interventions) if interventions else nullcontext()
    with ctx, tqdm(total=len(convs), desc="generate", unit="conv", disable=not show) as bar:
        for rows in batches:
            outs = _generate_batch(
                model,
                [prompts[i] for i in rows],
                rows,
                [row_seeds[i] for i in rows],
                max_new_tokens,
                temperature,
                top_p,
                use_cache,
                top_logprobs,
                stops,
            )
            for i, (ids, finished, logprobs) in zip(rows, outs, strict=True):
                body = ids[:-1] if finished else ids
                text = model.tokenizer.decode(body, skip_special_tokens=True)
                text, hit = _cut_at_stop(text, stops)
                results[i] = Generation(convs[i], text.strip(), prompts[i], ids, finished, logprobs, hit)
            bar.update(len(rows))
    return [r for r in results if r is not None]


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """``text`` up to the earliest stop string, and that string (``None`` when none occurs)."""
    best: tuple[int, str] | None = None
    for s in stops:
        at = text.find(s)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, s)
    return (text, None) if best is None else (text[: best[0]], best[1])


def _step_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """Per row: the chosen token's log-probability and the top ``k`` (one device-to-host copy per step)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top_vals, top_ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    chosen_vals = logp.gather(-1, chosen.view(-1, 1)).squeeze(-1)
    vals, ids, picked = top_vals.cpu().tolist(), top_ids.cpu().tolist(), chosen_vals.cpu().tolist()
    chosen_ids = chosen.cpu().tolist()
    return [
        TokenLogprobs(int(chosen_ids[b]), float(picked[b]), tuple(zip(ids[b], vals[b], strict=True)))
        for b in range(len(chosen_ids))
    ]


def _generate_batch(
    model: Model,
    prompts: list[list[int]],
    rows: list[int],
    seeds: list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    use_cache: bool,
    top_logprobs: int = 0,
    stops: Sequence[str] = (),
) -> list[tuple[list[int], bool, list[TokenLogprobs] | None]]:
    device = model.device
    batch = len(prompts)
    pad_id = int(model.tokenizer.pad_token_id)
    eos = model.eos_token_ids()
    prompt_roles = [[PROMPT] * (len(p) - 1) + [PROMPT_LAST] for p in prompts]
    ids, roles = pad(prompts, prompt_roles, pad_id, left=True, device=device)  # every prompt ends at the last column
    mask = attention_mask(roles)
    row_index = torch.tensor(rows, device=device)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    generated: list[list[int]] = [[] for _ in range(batch)]
    step_logprobs: list[list[TokenLogprobs]] | None = [[] for _ in range(batch)] if top_logprobs > 0 else None
    finished = [False] * batch
    stopped = [False] * batch  # ended by a stop string (treated as done, but not an end token)
    # enough trailing tokens to contain any stop string (a token decodes to at least one character, or a byte)
    stop_window = 4 * max((len(s.encode()) for s in stops), default=0) + 2
    past: Any = None
    step_ids, step_roles = ids, roles
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if use_cache:
            feed_pos = positions[:, -step_ids.shape[1] :]
            out, _ = forward(
                model,
                step_ids,
                step_roles,
                row_index,
                mask=mask,
                keep_last=1,
                position_ids=feed_pos,
                use_cache=True,
                cache=past,
            )
            past = output_cache(model, out)
        else:
            out, _ = forward(model, ids, roles, row_index, mask=mask, keep_last=1, position_ids=positions)
        logits = out.logits[:, -1, :]
        next_tokens = _sample(logits, temperature, top_p, gens)
        step_lp = _step_logprobs(logits, next_tokens, top_logprobs) if step_logprobs is not None else None
        for b in range(batch):
            if not (finished[b] or stopped[b]):
                tok = int(next_tokens[b])
                generated[b].append(tok)
                if step_logprobs is not None and step_lp is not None:
                    step_logprobs[b].append(step_lp[b])
                finished[b] = tok in eos
                if stops and not finished[b]:
                    tail = model.tokenizer.decode(generated[b][-stop_window:], skip_special_tokens=True)
                    stopped[b] = any(s in tail for s in stops)
        done = [f or s for f, s in zip(finished, stopped, strict=True)]
        if all(done):
            break
        next_tokens = torch.where(torch.tensor(done, device=device), pad_id, next_tokens).view(-1, 1)
        step_ids = next_tokens
        step_roles = torch.full((batch, 1), RESPONSE, dtype=torch.long, device=device)
        ids = torch.cat([ids, step_ids], dim=1)
        roles = torch.cat([roles, step_roles], dim=1)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long, device=device)], dim=1)
    return [(generated[b], finished[b], step_logprobs[b] if step_logprobs is not None else None) for b in range(batch)]
