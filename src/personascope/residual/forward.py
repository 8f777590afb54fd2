"""One forward-pass assembly: padding, token roles, and the call into the causal LM.

Capture, generation, likelihood scoring and training build their batches with :func:`pad` and run them with
:func:`forward`, so every forward pass the library makes tells the engine the role of each token and each batch
row's index (interventions then act on the right positions), honours what the model's ``forward`` accepts
(:meth:`~personascope.models.Model.forward_accepts`, peft wrappers included), asks for the logits it needs only
(``logits_to_keep`` where supported) and passes a KV cache under the name the installed transformers uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from personascope.residual.positions import PAD, token_roles

if TYPE_CHECKING:
    from personascope.models.loading import Model


def pad(
    sequences: Sequence[Sequence[int]],
    roles: Sequence[Sequence[int]],
    pad_id: int,
    *,
    left: bool = False,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch, width]`` token ids and roles; padding (role ``PAD``) on the right by default, which leaves every
    real token at its own position, or on the left (generation: every prompt ends at the last column)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    role_t = torch.full((len(sequences), width), PAD, dtype=torch.long)
    for b, (seq, seq_roles) in enumerate(zip(sequences, roles, strict=True)):
        n = len(seq)
        cols = slice(width - n, width) if left else slice(0, n)
        ids[b, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        role_t[b, cols] = torch.as_tensor(list(seq_roles), dtype=torch.long)
    if device is not None:
        ids, role_t = ids.to(device), role_t.to(device)
    return ids, role_t


def attention_mask(roles: torch.Tensor) -> torch.Tensor:
    """1 for real tokens, 0 for padding."""
    return (roles != PAD).long()


def cache_name(model: Model) -> str:
    """The keyword the model's ``forward`` takes its KV cache under (``cache`` from transformers 5.24 on)."""
    return "cache" if model.forward_accepts("cache") else "past_key_values"


def forward(
    model: Model,
    ids: torch.Tensor,
    roles: torch.Tensor,
    rows: Sequence[int] | torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    keep_last: int | None = None,
    cache: Any = None,
    use_cache: bool = False,
    **kwargs: Any,
) -> tuple[Any, int]:
    """Run ``model`` on one batch; returns the model output and the position of its first logit column.

    ``roles`` describe the tokens being fed (``[batch, seq]``) and ``rows`` each batch row's index into the call's
    inputs (for per-conversation coefficients and token spans). ``mask`` defaults to the real tokens of ``roles``
    (give it when the KV cache holds earlier tokens). ``keep_last=k`` computes logits for the last ``k`` positions
    only where the model supports it; the returned offset says which position ``logits[:, 0]`` belongs to. With
    ``use_cache=True``, ``cache`` is the cache from the previous call (see :func:`output_cache`). Other keyword
    arguments (``position_ids``, ``labels``...) go to the model as they are.
    """
    width = ids.shape[1]
    call: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": attention_mask(roles) if mask is None else mask,
        "use_cache": use_cache,
        **kwargs,
    }
    if use_cache:
        call[cache_name(model)] = cache
    if keep_last is not None and 0 < keep_last < width and model.forward_accepts("logits_to_keep"):
        call["logits_to_keep"] = keep_last
    row_index = None
    if rows is not None:
        row_index = rows if isinstance(rows, torch.Tensor) else torch.tensor(list(rows), device=ids.device)
    with token_roles(model, roles, row_index):
        out = model.hf_model(**call)
    logits = getattr(out, "logits", None)
    offset = width - logits.shape[1] if isinstance(logits, torch.Tensor) else 0
    return out, offset


def output_cache(model: Model, out: Any) -> Any:
    """The KV cache a :func:`forward` call with ``use_cache=True`` returned."""
    return getattr(out, cache_name(model))
