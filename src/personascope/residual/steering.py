"""Steering: a persona vector turned into additions to the residual stream, by one policy.

A :class:`Steering` says which direction is added at which layers, with which coefficients, on which token
positions. Every steered path (the Python API, ``personascope generate`` / ``steer`` / ``serve``, finetuning,
evaluation, monitoring, preferences) builds it with :meth:`Steering.from_vector`, so they all resolve a vector the
same way:

- ``layer``: an int, a list or range of ints (several layers at once), or ``None`` for the vector's chosen layer
  (:attr:`~personascope.vectors.PersonaVector.chosen_layer`, written by ``personascope sweep``). No chosen layer is
  an error naming the flag to pass; there is no silent fallback to a middle layer.
- ``coef``: a float shared by all layers, a list with one float per layer, a 1-D tensor of per-conversation
  coefficients (a whole coefficient sweep in one batch), or ``None`` for the vector's chosen coefficient
  (:attr:`~personascope.vectors.PersonaVector.chosen_coef`). No chosen coefficient is an error; a coefficient is
  never silently 0.
- non-finite coefficients or directions are refused, and a PersonaVector is checked against the model.

``with steering.apply(model):`` attaches the additions for the block (hooks removed exactly on exit);
:meth:`Steering.interventions` gives them for ``generate(..., interventions=...)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personascope.errors import PersonascopeError
from personascope.residual.interventions import Add, Intervention, intervene, resolve_direction
from personascope.residual.positions import Positions, TokenSpans, check_positions

if TYPE_CHECKING:
    from personascope.models.loading import Model
    from personascope.vectors import PersonaVector

Coef = float | torch.Tensor
LayerSpec = int | Sequence[int] | range | None
CoefSpec = float | Sequence[float] | torch.Tensor | None


def _name(vector: Any, source: str | None) -> str:
    if source:
        return source
    trait = getattr(vector, "trait", None)
    return f"the {trait} vector" if trait else "the vector"


def _flag_hint(flag: str, python: str | None = None) -> str:
    return f"pass {flag} ({python or flag.lstrip('-')}= in Python)"


def check_coef(coef: Any, what: str = "the steering coefficient") -> Coef:
    """A finite float, or a 1-D tensor of finite per-conversation coefficients."""
    if isinstance(coef, torch.Tensor):
        if coef.dim() == 0:
            coef = float(coef)
        else:
            if coef.dim() != 1 or coef.numel() == 0:
                raise PersonascopeError(f"{what} must be a number or a 1-D tensor with one entry per conversation")
            if not bool(torch.isfinite(coef).all()):
                raise PersonascopeError(f"{what} must be finite; got {coef.tolist()}")
            return coef.detach().float()
    if isinstance(coef, bool) or not isinstance(coef, int | float):
        raise PersonascopeError(f"{what} must be a number, got {coef!r}")
    if not math.isfinite(float(coef)):
        raise PersonascopeError(f"{what} must be a finite number, got {coef}")
    return float(coef)


def require_chosen_layer(
    vector: Any, *, source: str | None = None, flag: str = "--layer", python: str | None = None
) -> int:
    """The vector's chosen layer, or the one-line error naming the flag (and Python argument) to pass instead."""
    chosen = getattr(vector, "chosen_layer", None)
    if chosen is None:
        raise PersonascopeError(
            f"{_name(vector, source)} has no chosen layer; {_flag_hint(flag, python)} or run `personascope sweep` on it"
        )
    return int(chosen)


def check_choices(vector: Any, layer: LayerSpec = None, coef: CoefSpec = None, *, source: str | None = None) -> None:
    """Fail before any model loads when a layer or coefficient is neither given nor chosen on the vector (the same
    errors :meth:`Steering.from_vector` would give later)."""
    if layer is None:
        require_chosen_layer(vector, source=source)
    n = len(layer) if isinstance(layer, range | Sequence) and not isinstance(layer, str | bytes) else 1
    chosen_coefs(vector, coef, n, source=source)


def chosen_layers(
    model: Model,
    vector: Any,
    layer: LayerSpec,
    *,
    source: str | None = None,
    flag: str = "--layer",
    python: str | None = None,
) -> list[int]:
    """The layers to use: ``layer`` as given (an int or several), else the vector's chosen layer, else an error."""
    if layer is None:
        layers = [require_chosen_layer(vector, source=source, flag=flag, python=python)]
    elif isinstance(layer, int) and not isinstance(layer, bool):
        layers = [layer]
    elif isinstance(layer, range | Sequence) and not isinstance(layer, str | bytes):
        layers = list(layer)
        if not layers:
            raise PersonascopeError("steering needs at least one layer")
        if any(isinstance(x, bool) or not isinstance(x, int) for x in layers):
            raise PersonascopeError(f"steering layers must be integers, got {layers!r}")
        if len(set(layers)) != len(layers):
            raise PersonascopeError(f"steering layers must not repeat, got {layers}")
    else:
        raise PersonascopeError(f"a steering layer must be an integer or a list of integers, got {layer!r}")
    for x in layers:
        model.check_layer(x)
    return layers


def chosen_coefs(
    vector: Any, coef: CoefSpec, n_layers: int, *, source: str | None = None, flag: str = "--coef"
) -> list[Coef]:
    """One coefficient per layer: ``coef`` as given (shared, or one per layer), else the vector's chosen one."""
    if coef is None:
        chosen = getattr(vector, "chosen_coef", None)
        if chosen is None:
            raise PersonascopeError(
                f"{_name(vector, source)} has no chosen coefficient; {_flag_hint(flag)} or run `personascope sweep`"
            )
        coef = chosen
    if isinstance(coef, torch.Tensor | int | float):
        return [check_coef(coef)] * n_layers
    if isinstance(coef, Sequence) and not isinstance(coef, str | bytes):
        values = list(coef)
        if len(values) != n_layers:
            raise PersonascopeError(
                f"got {len(values)} steering coefficients for {n_layers} layers; give one per layer or one for all"
            )
        return [check_coef(c) for c in values]
    raise PersonascopeError(f"the steering coefficient must be a number, got {coef!r}")


@dataclass(frozen=True)
class Steering:
    """Add ``coefs[k] · directions[k]`` at ``layers[k]`` on ``positions``, for every ``k``.

    Build it with :meth:`from_vector` (the one policy for defaults and checks); the constructor takes resolved
    values as they are. ``source`` names where the vector came from, for messages and logs.
    """

    directions: tuple[torch.Tensor, ...]
    layers: tuple[int, ...]
    coefs: tuple[Coef, ...]
    positions: Positions | TokenSpans = "all"
    source: str | None = None

    def __post_init__(self) -> None:
        if not (len(self.directions) == len(self.layers) == len(self.coefs)) or not self.layers:
            raise PersonascopeError("a Steering needs one direction and one coefficient per layer, and a layer")

    @classmethod
    def from_vector(
        cls,
        model: Model,
        vector: PersonaVector | str | Path | torch.Tensor,
        layer: LayerSpec = None,
        coef: CoefSpec = None,
        positions: Positions | TokenSpans | str = "all",
        *,
        source: str | None = None,
    ) -> Steering:
        """Resolve a vector (a PersonaVector, its ``.safetensors`` path, or a ``[num_layers + 1, hidden]`` /
        ``[hidden]`` tensor) into a Steering for ``model``; see the module docs for the defaults and checks."""
        from personascope.vectors import PersonaVector

        if isinstance(vector, str | Path):
            source = source or str(vector)
            vector = PersonaVector.load(vector)
        if isinstance(vector, PersonaVector):
            vector.check_compatible(model)
        elif not isinstance(vector, torch.Tensor):
            raise PersonascopeError(f"steer with a PersonaVector, its file or a tensor, not {type(vector).__name__}")
        pos = positions if isinstance(positions, TokenSpans) else check_positions(positions)
        layers = chosen_layers(model, vector, layer, source=source)
        coefs = chosen_coefs(vector, coef, len(layers), source=source)
        directions = []
        for x in layers:
            d = resolve_direction(model, vector, x)  # not detached: gradients may flow into a learned direction
            if d.dim() != 1 or d.shape[0] != model.hidden_size:
                raise PersonascopeError(
                    f"a steering direction must have size {model.hidden_size} (the hidden size of {model.name}), "
                    f"got {tuple(d.shape)}"
                )
            if not bool(torch.isfinite(d).all()):
                raise PersonascopeError(f"{_name(vector, source)} has non-finite values at layer {x}; re-extract it")
            directions.append(d)
        return cls(tuple(directions), tuple(layers), tuple(coefs), pos, source)

    # ------------------------------------------------------------------ views
    @property
    def layer(self) -> int:
        """The layer, for a single-layer steering."""
        if len(self.layers) != 1:
            raise PersonascopeError(f"this steering spans layers {list(self.layers)}; use .layers")
        return self.layers[0]

    @property
    def coef(self) -> Coef:
        """The coefficient, when all layers share one."""
        first = self.coefs[0]
        same = all(c is first for c in self.coefs) or (
            all(isinstance(c, float) for c in self.coefs) and len(set(self.coefs)) == 1
        )
        if not same:
            raise PersonascopeError("this steering has one coefficient per layer; use .coefs")
        return first

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: layers, coefficients (per-row tensors as lists), positions, source."""

        def plain(c: Coef) -> float | list[float]:
            return c.tolist() if isinstance(c, torch.Tensor) else c

        positions = self.positions if isinstance(self.positions, str) else repr(self.positions)
        out: dict[str, Any] = {"positions": positions, "source": self.source}
        if len(self.layers) == 1:
            out |= {"layer": self.layers[0], "coef": plain(self.coefs[0])}
        else:
            out |= {"layers": list(self.layers), "coefs": [plain(c) for c in self.coefs]}
        return out

    # ------------------------------------------------------------------ variants
    def with_coef(self, coef: float | Sequence[float] | torch.Tensor) -> Steering:
        """The same directions and layers with other coefficients (checked like :meth:`from_vector`'s)."""
        return replace(self, coefs=tuple(chosen_coefs(None, coef, len(self.layers))))

    def scaled(self, factor: float | torch.Tensor) -> Steering:
        """Every coefficient multiplied by ``factor`` (a float, or per-conversation factors)."""
        f = check_coef(factor, "the scale factor")
        return replace(self, coefs=tuple(check_coef(c * f) for c in self.coefs))

    def with_positions(self, positions: Positions | TokenSpans | str) -> Steering:
        pos = positions if isinstance(positions, TokenSpans) else check_positions(positions)
        return replace(self, positions=pos)

    # ------------------------------------------------------------------ use
    def interventions(self) -> list[Intervention]:
        """The engine interventions (one :class:`~personascope.residual.Add` per layer)."""
        out: list[Intervention] = [
            Add(d, layer, c, self.positions)
            for d, layer, c in zip(self.directions, self.layers, self.coefs, strict=True)
        ]
        return out

    @contextmanager
    def apply(self, model: Model) -> Iterator[Steering]:
        """Steer ``model`` inside the ``with`` block (nests; hooks removed on exit and on exceptions)."""
        with intervene(model, self.interventions()):
            yield self


@contextmanager
def steering(
    model: Model,
    vector: PersonaVector | str | Path | torch.Tensor,
    layer: LayerSpec = None,
    coef: CoefSpec = None,
    positions: Positions | TokenSpans | str = "all",
) -> Iterator[Steering]:
    """Steer ``model`` inside the ``with`` block: :meth:`Steering.from_vector` then :meth:`Steering.apply`.

    ``layer`` and ``coef`` default to the vector's chosen ones (an error when it has none).
    """
    with Steering.from_vector(model, vector, layer, coef, positions).apply(model) as s:
        yield s
