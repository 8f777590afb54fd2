"""Token roles and the positions an intervention touches.

While the engine runs a forward pass (capture, generation, or a user's own call wrapped in :func:`token_roles`), it
knows the role of every token in the batch: padding, prompt, the last prompt token, response, or template tokens
after the response. A ``positions`` name selects the roles an intervention acts on:

- ``all``: every real token (padding excluded when roles are known; everything otherwise);
- ``prompt``: prompt tokens, the last one included;
- ``response``: response tokens only (during generation: every generated token);
- ``last_prompt_and_response``: the last prompt token and every response token (the persona-vector paper's
  "response" steering mode, which lets the first generated token feel the steer).
"""

from __future__ import annotations

from collections.abc import Iterator
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


def check_positions(positions: str) -> Positions:
    if positions not in _ROLE_SETS:
        raise PersonascopeError(f"unknown positions '{positions}'; use one of {', '.join(POSITIONS)}")
    return positions  # type: ignore[return-value]


def position_mask(positions: str, roles: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """Boolean mask ``[batch, seq]`` of the tokens ``positions`` selects, or ``None`` for "every token"."""
    if roles is None:
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
