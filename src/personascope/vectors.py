"""``PersonaVector``: one direction per residual-stream layer, with provenance, stored as safetensors.

The file holds a single float32 tensor ``directions`` of shape ``[num_layers + 1, hidden_size]`` (row ``L`` is the
direction at layer ``L``: row 0 the embedding output, row ``num_layers`` the last block's output before the final
norm) and the metadata as JSON in the safetensors header. No pickle anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from personascope.errors import PersonascopeError
from personascope.io import atomic_path

if TYPE_CHECKING:
    from personascope.models.loading import Model

_META_KEY = "personascope"
FORMAT_VERSION = 1


@dataclass
class PersonaVector:
    """Per-layer directions ``[num_layers + 1, hidden]`` plus metadata.

    ``metadata`` carries at least ``model_name``, ``hidden_size``, ``num_layers``; usually also ``trait``,
    ``method`` (e.g. ``response_mean``), ``source_run``, and after a sweep ``chosen_layer`` / ``chosen_coef``.
    """

    directions: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.directions, torch.Tensor) or self.directions.dim() != 2:
            raise PersonascopeError("PersonaVector directions must be a 2-D tensor [num_layers + 1, hidden]")
        self.directions = self.directions.detach().to("cpu", torch.float32).contiguous()
        self.metadata.setdefault("num_layers", self.directions.shape[0] - 1)
        self.metadata.setdefault("hidden_size", self.directions.shape[1])
        if self.metadata["num_layers"] != self.directions.shape[0] - 1:
            raise PersonascopeError("metadata num_layers does not match the directions' first dimension")
        if self.metadata["hidden_size"] != self.directions.shape[1]:
            raise PersonascopeError("metadata hidden_size does not match the directions' second dimension")

    @classmethod
    def for_model(cls, model: Model, directions: torch.Tensor, **metadata: Any) -> PersonaVector:
        meta = {"model_name": model.name, "num_layers": model.num_layers, "hidden_size": model.hidden_size}
        meta.update(metadata)
        return cls(directions, meta)

    @property
    def num_layers(self) -> int:
        return int(self.metadata["num_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.metadata["hidden_size"])

    @property
    def trait(self) -> str | None:
        return self.metadata.get("trait")

    @property
    def chosen_layer(self) -> int | None:
        value = self.metadata.get("chosen_layer")
        return None if value is None else int(value)

    @property
    def chosen_coef(self) -> float | None:
        """The steering coefficient ``personascope sweep`` recommended (``None`` before a sweep)."""
        value = self.metadata.get("chosen_coef")
        return None if value is None else float(value)

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.directions[layer]

    def unit(self, layer: int) -> torch.Tensor:
        d = self.directions[layer]
        return d / d.norm().clamp_min(1e-12)

    def norms(self) -> torch.Tensor:
        return self.directions.norm(dim=-1)

    def check_compatible(self, model: Model) -> None:
        """Raise a one-line error when the vector was made for a model of another shape."""
        if self.hidden_size != model.hidden_size or self.num_layers != model.num_layers:
            raise PersonascopeError(
                f"vector for {self.metadata.get('model_name', 'another model')} "
                f"({self.num_layers} layers, hidden {self.hidden_size}) does not fit {model.name} "
                f"({model.num_layers} layers, hidden {model.hidden_size}); extract a vector on this model"
            )

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file in the same folder, then rename)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        meta = {_META_KEY: json.dumps({"format_version": FORMAT_VERSION, **self.metadata}, sort_keys=True)}
        with atomic_path(target) as tmp:
            save_file({"directions": self.directions}, str(tmp), metadata=meta)
        return target

    @classmethod
    def load(cls, path: str | Path) -> PersonaVector:
        source = Path(path)
        if not source.is_file():
            raise PersonascopeError(f"vector file not found: {source}")
        try:
            tensors = load_file(str(source))
            from safetensors import safe_open

            with safe_open(str(source), framework="pt") as f:
                header = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise PersonascopeError(f"{source} is not a readable safetensors file ({exc})") from None
        if "directions" not in tensors or _META_KEY not in header:
            raise PersonascopeError(f"{source} is not a personascope vector (no 'directions' tensor or metadata)")
        try:
            meta = json.loads(header[_META_KEY])
        except json.JSONDecodeError:
            raise PersonascopeError(f"{source}: vector metadata is not valid JSON") from None
        meta.pop("format_version", None)
        return cls(tensors["directions"], meta)
