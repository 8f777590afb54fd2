"""Token roles and the positions an intervention touches.

While the engine runs a forward pass (capture, generation, or a user's own call wrapped in :func:`token_roles`), it
knows the role of every token in the batch: padding, prompt, the last prompt token, response, or template tokens
after the response. A ``positions`` name selects the roles an intervention acts on:

- ``all``: every real token (padding excluded when roles are known; everything otherwise);
- ``prompt``: prompt tokens, the last one included;
- ``response``: response tokens only (during generation: every generated token);
- ``last_prompt_and_response``: the last prompt token and every response token (the persona-vector paper's
  "response" steering mode, which lets the first generated token feel the steer).

Where a name is too coarse, :class:`TokenSpans` selects explicit token spans of each conversation's prompt (for
instance the tokens of one of two tasks shown side by side), and can stand wherever a ``positions`` name can.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal, get_args

import torch

from personascope.errors import PersonascopeError

if TYPE_CHECKING:
    from personascope.models.loading import Model

PAD, PROMPT, PROMPT_LAST, RESPONSE, OTHER = 0, 1, 2, 3, 4

Positions = Literal["all", "prompt", "response", "last_prompt_and_response"]
POSITIONS: tuple[str, ...] = get_args(Positions)

_ROLE_SETS: dict[str, tuple[int, ...]] = {
    "all": (PROMPT, PROMPT_LAST, RESPONSE, OTHER),
    "prompt": (PROMPT, PROMPT_LAST),
    "response": (RESPONSE,),
    "last_prompt_and_response": (PROMPT_LAST, RESPONSE),
}


class TokenSpans:
    """Explicit token spans of each conversation's prompt: ``spans[i]`` lists the ``(start, end)`` spans of
    conversation ``i`` (end exclusive; a conversation may have none).

    Indices count the conversation's own tokens as laid out by ``model.format`` (padding is not counted, so left
    and right padding give the same result), and conversation ``i`` is the one the engine's row index ``i``
    names: the ``i``-th input of the ``capture``, ``next_token_logprobs`` or ``generate`` call, exactly as for
    per-row coefficients. Only prompt tokens can be selected: a span must end within its conversation's prompt
    (checked during the forward pass), and cached decoding steps, which feed response tokens only, are left alone.
    Use it as the ``positions`` of :class:`~personascope.residual.Add` (or ``Ablate`` / ``Cap``).
    """

    __slots__ = ("_ends", "_starts", "spans")

    def __init__(self, spans: Sequence[Sequence[tuple[int, int]]]) -> None:
        if isinstance(spans, str | bytes) or not isinstance(spans, Sequence) or not spans:
            raise PersonascopeError("TokenSpans needs a non-empty list with one list of (start, end) spans per row")
        clean: list[tuple[tuple[int, int], ...]] = []
        for i, row in enumerate(spans):
            if isinstance(row, str | bytes) or not isinstance(row, Sequence):
                raise PersonascopeError(f"TokenSpans: conversation {i} needs a list of (start, end) spans")
            out = []
            for span in row:
                try:
                    if isinstance(span, str | bytes) or len(span) != 2 or any(isinstance(x, bool) for x in span):
                        raise TypeError
                    start, end = operator.index(span[0]), operator.index(span[1])  # ints, numpy ints; not floats
                except TypeError:
                    raise PersonascopeError(
                        f"TokenSpans: conversation {i} has {span!r}; give (start, end) integers"
                    ) from None
                if not 0 <= start < end:
                    raise PersonascopeError(
                        f"TokenSpans: conversation {i} has span ({start}, {end}); need 0 <= start < end"
                    )
                out.append((start, end))
            clean.append(tuple(out))
        self.spans: tuple[tuple[tuple[int, int], ...], ...] = tuple(clean)
        width = max(1, max(len(r) for r in clean))
        self._starts = torch.zeros(len(clean), width, dtype=torch.long)
        self._ends = torch.zeros(len(clean), width, dtype=torch.long)  # (0, 0) pads: an empty span selects nothing
        for i, row in enumerate(clean):
            for k, (start, end) in enumerate(row):
                self._starts[i, k], self._ends[i, k] = start, end

    def __len__(self) -> int:
        return len(self.spans)

    def __repr__(self) -> str:
        return f"TokenSpans({len(self.spans)} conversations)"

    def mask(self, roles: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Boolean ``[batch, seq]`` mask of the selected tokens for a batch with these ``roles`` and ``rows``."""
        batch = roles.shape[0]
        index = rows.to(device="cpu", dtype=torch.long) if rows is not None else torch.arange(batch, dtype=torch.long)
        if index.numel() != batch:
            raise PersonascopeError(f"token row indices have {index.numel()} entries for a batch of {batch} rows")
        if batch and (int(index.min()) < 0 or int(index.max()) >= len(self.spans)):
            raise PersonascopeError(
                f"TokenSpans covers {len(self.spans)} conversations but the forward pass includes conversation "
                f"{int(index.max())}; give spans for every conversation of the call"
            )
        prompt = torch.isin(roles, torch.tensor((PROMPT, PROMPT_LAST), device=roles.device, dtype=roles.dtype))
        n_prompt = prompt.sum(dim=1).cpu()
        ends = self._ends[index]
        over = (n_prompt > 0) & (ends.max(dim=1).values > n_prompt)
        if bool(over.any()):
            b = int(over.nonzero()[0, 0])
            raise PersonascopeError(
                f"TokenSpans: conversation {int(index[b])} has a span ending at token {int(ends[b].max())} but its "
                f"prompt has only {int(n_prompt[b])} tokens; spans select prompt tokens only"
            )
        position = (roles != PAD).long().cumsum(dim=1) - 1  # index of each token among the row's real tokens
        starts = self._starts[index].to(roles.device).unsqueeze(-1)
        inside = (position.unsqueeze(1) >= starts) & (position.unsqueeze(1) < ends.to(roles.device).unsqueeze(-1))
        return inside.any(dim=1) & prompt


def check_positions(positions: str) -> Positions:
    if positions not in _ROLE_SETS:
        raise PersonascopeError(f"unknown positions '{positions}'; use one of {', '.join(POSITIONS)}")
    return positions  # type: ignore[return-value]


def position_mask(
    positions: str | TokenSpans, roles: torch.Tensor | None, shape: torch.Size, rows: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Boolean mask ``[batch, seq]`` of the tokens ``positions`` selects, or ``None`` for "every token".

    ``rows`` (each batch row's index into the call's inputs) is needed only by :class:`TokenSpans`.
    """
    if roles is None:
        if isinstance(positions, TokenSpans):
            raise PersonascopeError(
                "TokenSpans positions need to know where each conversation's tokens are; run through "
                "personascope.capture / next_token_logprobs / generate, or wrap the forward pass in "
                "personascope.residual.token_roles(...)"
            )
        if positions == "all":
            return None
        raise PersonascopeError(
            f"positions='{positions}' needs to know which tokens are prompt and response; run through "
            "personascope.generate / capture, or wrap the forward pass in personascope.residual.token_roles(...)"
        )
    if tuple(roles.shape) != tuple(shape[:2]):
        raise PersonascopeError(
            f"token roles have shape {tuple(roles.shape)} but the forward pass has {tuple(shape[:2])}; "
            "set token_roles for exactly the tokens being fed"
        )
    if isinstance(positions, TokenSpans):
        return positions.mask(roles, rows)
    wanted = torch.tensor(_ROLE_SETS[positions], device=roles.device, dtype=roles.dtype)
    return torch.isin(roles, wanted)


def get_forward_state(model: Model) -> dict[str, torch.Tensor | None]:
    return model._state.setdefault("forward", {"roles": None, "rows": None})


@contextmanager
def token_roles(model: Model, roles: torch.Tensor | None, rows: torch.Tensor | None = None) -> Iterator[None]:
    """Tell the engine the role of each token (``[batch, seq]``) and, optionally, each batch row's index.

    ``rows`` maps batch rows to indices into per-row coefficient tensors, so one sweep can be split into batches.
    Restores the previous state on exit, so it nests.
    """
    state = get_forward_state(model)
    saved = dict(state)
    state["roles"], state["rows"] = roles, rows
    try:
        yield
    finally:
        state.clear()
        state.update(saved)
