"""Interventions on the residual stream: add, ablate, cap — at chosen layers and positions.

Each intervention is a small frozen dataclass with an ``apply`` method; :func:`intervene` attaches a list of them
(several layers at once) for the duration of a ``with`` block and removes the hooks exactly on exit, on exceptions,
and when nested. All operations are out-of-place, so gradients flow through them during training.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from personascope.errors import PersonascopeError
from personascope.residual.hooks import SiteFn, site_hooks
from personascope.residual.positions import (
    Positions,
    TokenSpans,
    check_positions,
    get_forward_state,
    position_mask,
)

if TYPE_CHECKING:
    from personascope.models.loading import Model
    from personascope.vectors import PersonaVector


def _as_direction(direction: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return direction.to(device=like.device, dtype=like.dtype)


def _unit(direction: torch.Tensor) -> torch.Tensor:
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise PersonascopeError("cannot ablate or cap along a zero (or non-finite) direction")
    return direction / norm


def _row_coef(coef: float | torch.Tensor, h: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor | float:
    if not isinstance(coef, torch.Tensor) or coef.dim() == 0:
        return float(coef)
    c = coef.to(device=h.device, dtype=h.dtype)
    if rows is not None:
        c = c[rows.to(c.device)]
    if c.shape[0] != h.shape[0]:
        raise PersonascopeError(
            f"per-row coefficients have {c.shape[0]} entries but the batch has {h.shape[0]} rows; give one "
            "coefficient per conversation"
        )
    return c.view(-1, 1, 1)


def _masked(delta: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return delta if mask is None else delta * mask.unsqueeze(-1).to(delta.dtype)


@dataclass(frozen=True)
class Add:
    """``h ← h + coef · direction`` on the selected positions (``direction`` used as given, not normalised).

    ``coef`` may be a float or a 1-D tensor with one coefficient per conversation (per batch row). ``positions`` is
    a name (see :mod:`~personascope.residual.positions`) or explicit per-conversation :class:`TokenSpans`.
    """

    direction: torch.Tensor
    layer: int
    coef: float | torch.Tensor = 1.0
    positions: Positions | TokenSpans = "all"

    def apply(self, h: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
        delta = _row_coef(self.coef, h, rows) * _as_direction(self.direction, h)
        return h + _masked(torch.broadcast_to(delta, h.shape), mask)


@dataclass(frozen=True)
class Ablate:
    """Remove the component along the unit direction: ``h ← h − (h·u) u`` on the selected positions."""

    direction: torch.Tensor
    layer: int
    positions: Positions | TokenSpans = "all"

    def apply(self, h: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
        u = _unit(_as_direction(self.direction, h))
        return h - _masked((h @ u).unsqueeze(-1) * u, mask)


@dataclass(frozen=True)
class Cap:
    """Clamp the projection on the unit direction at ``threshold``.

    ``side="upper"`` keeps ``h·u <= threshold``; ``side="lower"`` keeps ``h·u >= threshold``. Only the component
    along ``u`` changes.
    """

    direction: torch.Tensor
    layer: int
    threshold: float
    side: Literal["upper", "lower"] = "upper"
    positions: Positions | TokenSpans = "all"

    def apply(self, h: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
        u = _unit(_as_direction(self.direction, h))
        proj = (h @ u).unsqueeze(-1)
        if self.side == "upper":
            shift = -torch.relu(proj - self.threshold)
        elif self.side == "lower":
            shift = torch.relu(self.threshold - proj)
        else:
            raise PersonascopeError(f"Cap side must be 'upper' or 'lower', not '{self.side}'")
        return h + _masked(shift * u, mask)


Intervention = Add | Ablate | Cap


def _validate(model: Model, item: Intervention) -> None:
    model.check_layer(item.layer)
    if not isinstance(item.positions, TokenSpans):
        check_positions(item.positions)
    d = item.direction
    if not isinstance(d, torch.Tensor) or d.dim() != 1 or d.shape[0] != model.hidden_size:
        shape = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
        raise PersonascopeError(
            f"{type(item).__name__} direction must be a 1-D tensor of size {model.hidden_size} "
            f"(the hidden size of {model.name}), got {shape}"
        )


def _site_fn(model: Model, items: list[Intervention]) -> SiteFn:
    state = get_forward_state(model)

    def fn(h: torch.Tensor) -> torch.Tensor:
        roles, rows = state.get("roles"), state.get("rows")
        for item in items:
            h = item.apply(h, position_mask(item.positions, roles, h.shape, rows), rows)
        return h

    return fn


@contextmanager
def intervene(model: Model, interventions: Sequence[Intervention]) -> Iterator[None]:
    """Apply ``interventions`` (any layers, in list order within a layer) inside the ``with`` block."""
    by_layer: dict[int, list[Intervention]] = {}
    for item in interventions:
        _validate(model, item)
        by_layer.setdefault(item.layer, []).append(item)
    with site_hooks(model, {layer: _site_fn(model, items) for layer, items in by_layer.items()}, prepend=True):
        yield


def resolve_direction(model: Model, vector: PersonaVector | torch.Tensor, layer: int) -> torch.Tensor:
    """The direction at ``layer`` from a PersonaVector (checked against the model), a ``[L+1, H]`` or ``[H]`` tensor."""
    from personascope.vectors import PersonaVector

    model.check_layer(layer)
    if isinstance(vector, PersonaVector):
        vector.check_compatible(model)
        return vector.directions[layer]
    if vector.dim() == 2:
        if vector.shape[0] != model.num_layers + 1:
            raise PersonascopeError(
                f"a per-layer vector needs {model.num_layers + 1} rows for {model.name}, got {vector.shape[0]}"
            )
        return vector[layer]
    return vector
