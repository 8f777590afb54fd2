"""Capture: reduce residual-stream activations inside forward hooks while the batch runs.

No ``output_hidden_states`` and no ``[batch, seq, layers, hidden]`` tensor: at each requested layer the hook turns
the batch's ``[batch, seq, hidden]`` block into ``[reductions, batch, hidden]`` (masked means, last prompt token)
with one weighted sum, writes it into the preallocated result, and lets the activations go. Inputs are sorted by
length so batches waste little on padding (right padding, which leaves real tokens exact), results come back in input
order, and the forward pass stops after the deepest requested layer.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import torch
from tqdm.auto import tqdm

from personascope.errors import PersonascopeError
from personascope.models.chat import Conversation, FormattedConversation
from personascope.residual.forward import forward, pad
from personascope.residual.hooks import site_hooks
from personascope.residual.positions import OTHER, PROMPT, PROMPT_LAST, RESPONSE

if TYPE_CHECKING:
    from personascope.models.loading import Model
    from personascope.vectors import PersonaVector

Reduction = Literal["response_mean", "prompt_mean", "prompt_last"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


class _StopForward(Exception):
    """Raised by the last capture hook: nothing past the deepest requested layer needs computing."""


def format_all(
    model: Model, conversations: Sequence[Conversation | FormattedConversation]
) -> list[FormattedConversation]:
    out = []
    for i, conv in enumerate(conversations):
        if isinstance(conv, FormattedConversation):
            out.append(conv)
            continue
        try:
            out.append(model.format(conv))
        except PersonascopeError as exc:
            raise PersonascopeError(f"conversation {i}: {exc}") from None
    return out


def roles_for(conv: FormattedConversation) -> list[int]:
    """The role of every token of a formatted conversation (see :mod:`personascope.residual.positions`)."""
    roles = [PROMPT] * conv.prompt_end
    roles[-1] = PROMPT_LAST
    tail = len(conv) - conv.prompt_end
    roles += [OTHER] * tail
    if conv.response is not None:
        start, end = conv.response
        roles[start:end] = [RESPONSE] * (end - start)
    return roles


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (the peak memory shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _directions_tensor(
    model: Model, directions: PersonaVector | torch.Tensor | None, layers: list[int]
) -> torch.Tensor | None:
    """Unit directions as ``[len(layers), D, hidden]`` float32, or None."""
    from personascope.vectors import PersonaVector

    if directions is None:
        return None
    per_layer = isinstance(directions, PersonaVector) or (
        isinstance(directions, torch.Tensor) and directions.dim() == 3
    )
    if isinstance(directions, PersonaVector):
        directions.check_compatible(model)
        d = directions.directions[layers].unsqueeze(1)
    else:
        d = directions.detach().float()
        if d.dim() == 1:
            d = d.unsqueeze(0)
        if d.dim() == 2:
            d = d.unsqueeze(0).expand(len(layers), -1, -1)
        elif d.dim() == 3:
            if d.shape[0] != model.num_layers + 1:
                raise PersonascopeError(
                    f"per-layer directions need {model.num_layers + 1} layers for {model.name}, got {d.shape[0]}"
                )
            d = d[layers]
        else:
            raise PersonascopeError("directions must be [hidden], [D, hidden] or [num_layers + 1, D, hidden]")
    if d.shape[-1] != model.hidden_size:
        raise PersonascopeError(
            f"directions have size {d.shape[-1]} but {model.name} has hidden size {model.hidden_size}"
        )
    norms = d.norm(dim=-1, keepdim=True)
    zero = norms == 0
    if bool(zero.all()) or (not per_layer and bool(zero.any())):
        raise PersonascopeError("a projection direction is zero; pass non-zero directions")
    # per-layer directions may be zero at some layers (e.g. at the embedding layer, when both prompts of a contrast
    # end in the same token): the projection is NaN there rather than an error for the whole call
    return (d / norms.masked_fill(zero, float("nan"))).float()


def _layers(model: Model, layers: Sequence[int] | None) -> list[int]:
    layer_list = list(range(model.num_layers + 1)) if layers is None else [model.check_layer(int(x)) for x in layers]
    if not layer_list:
        raise PersonascopeError("ask for at least one layer")
    if len(set(layer_list)) != len(layer_list):
        raise PersonascopeError("layers must not repeat")
    return layer_list


def reduction_span(conv: FormattedConversation, reduction: str) -> tuple[int, int]:
    """The token span a named reduction averages over."""
    if reduction == "response_mean":
        if conv.response is None:
            raise PersonascopeError("response_mean needs a trailing assistant message")
        return conv.response
    if reduction == "prompt_mean":
        return 0, conv.prompt_end
    if reduction == "prompt_last":
        return conv.prompt_end - 1, conv.prompt_end
    raise PersonascopeError(f"unknown reduction '{reduction}'; use any of {', '.join(REDUCTIONS)}")


@torch.no_grad()
def capture(
    model: Model,
    conversations: Sequence[Conversation | FormattedConversation],
    reductions: Sequence[str] = ("response_mean", "prompt_mean", "prompt_last"),
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    directions: PersonaVector | torch.Tensor | None = None,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Reduced residual activations for each conversation.

    Returns ``{reduction: tensor}``, each float32 ``[N, len(layers), hidden]`` (all ``num_layers + 1`` layers when
    ``layers`` is None, in the order given). With ``directions`` (a PersonaVector, ``[D, hidden]`` shared by all
    layers, or ``[num_layers + 1, D, hidden]``), returns projections on the unit directions instead,
    ``[N, len(layers), D]`` (NaN at a layer where a per-layer direction is zero; all zero, or a zero shared
    direction, is an error). Reductions: ``response_mean`` (mean over the trailing assistant message's content
    tokens), ``prompt_mean`` (mean over prompt tokens), ``prompt_last`` (the last prompt token, i.e. the end of the
    assistant header, where the model is about to answer). ``progress=None`` shows a bar for more than one batch.
    """
    for r in reductions:
        if r not in REDUCTIONS:
            raise PersonascopeError(f"unknown reduction '{r}'; use any of {', '.join(REDUCTIONS)}")
    if not reductions:
        raise PersonascopeError("ask for at least one reduction")
    formatted = format_all(model, conversations)
    if "response_mean" in reductions:
        missing = [i for i, c in enumerate(formatted) if c.response is None]
        if missing:
            raise PersonascopeError(
                f"response_mean needs a trailing assistant message; conversation {missing[0]} has none "
                f"({len(missing)} in all)"
            )
    spans = [[reduction_span(c, r) for r in reductions] for c in formatted]
    out = capture_spans(
        model, formatted, spans, layers=layers, batch_size=batch_size, directions=directions, progress=progress
    )
    return {r: out[:, k] for k, r in enumerate(reductions)}


@torch.no_grad()
def capture_spans(
    model: Model,
    conversations: Sequence[Conversation | FormattedConversation],
    spans: Sequence[Sequence[tuple[int, int]]],
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    directions: PersonaVector | torch.Tensor | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Mean residual activation over each given token span: ``[N, S, len(layers), hidden or D]`` float32.

    ``spans[i]`` lists ``(start, end)`` token spans of conversation ``i`` (as laid out by ``model.format``); every
    conversation must have the same number of spans ``S`` (pad with a repeated span if needed). This is the
    engine's general masked reduction; :func:`capture` and per-turn monitoring are built on it.
    """
    if batch_size < 1:
        raise PersonascopeError("batch_size must be at least 1")
    layer_list = _layers(model, layers)
    formatted = format_all(model, conversations)
    if not formatted:
        raise PersonascopeError("no conversations to capture")
    if len(spans) != len(formatted):
        raise PersonascopeError(f"got spans for {len(spans)} conversations but {len(formatted)} conversations")
    n_spans = {len(s) for s in spans}
    if len(n_spans) != 1 or 0 in n_spans:
        raise PersonascopeError("every conversation needs the same, non-zero number of spans")
    for i, (conv, conv_spans) in enumerate(zip(formatted, spans, strict=True)):
        for start, end in conv_spans:
            if not 0 <= start < end <= len(conv):
                raise PersonascopeError(
                    f"conversation {i}: span ({start}, {end}) is empty or outside its {len(conv)} tokens"
                )
    unit = _directions_tensor(model, directions, layer_list)
    n, width, n_span = len(formatted), (unit.shape[1] if unit is not None else model.hidden_size), n_spans.pop()
    results = torch.zeros(n, n_span, len(layer_list), width, dtype=torch.float32)
    unit_dev = unit.to(model.device) if unit is not None else None
    deepest = max(layer_list)
    batches = length_batches([len(c) for c in formatted], batch_size)
    current: dict[str, torch.Tensor] = {}

    def make_fn(slot: int, layer: int):  # type: ignore[no-untyped-def]
        def fn(h: torch.Tensor) -> None:
            reduced = torch.einsum("sbt,bth->bsh", current["weights"], h.float())
            if unit_dev is not None:
                reduced = reduced @ unit_dev[slot].T
            results[current["rows"], :, slot] = reduced.cpu()
            if layer == deepest:
                raise _StopForward

        return fn

    pad_id = int(model.tokenizer.pad_token_id)
    show = progress if progress is not None else len(batches) > 1
    with (
        site_hooks(model, {layer: make_fn(i, layer) for i, layer in enumerate(layer_list)}),
        tqdm(total=n, desc="capture", unit="conv", disable=not show) as bar,
    ):
        for rows in batches:
            ids, roles, weights = _pack(formatted, rows, spans, pad_id, model.device)
            current["weights"], current["rows"] = weights, torch.tensor(rows)
            with contextlib.suppress(_StopForward):
                forward(model, ids, roles, rows)
            bar.update(len(rows))
    return results


def _pack(
    formatted: list[FormattedConversation],
    rows: list[int],
    spans: Sequence[Sequence[tuple[int, int]]],
    pad_id: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids and roles, and the ``[S, B, T]`` span-mean weights for one batch."""
    ids, roles = pad(
        [formatted[i].input_ids for i in rows], [roles_for(formatted[i]) for i in rows], pad_id, device=device
    )
    weights = torch.zeros(len(spans[rows[0]]), len(rows), ids.shape[1], dtype=torch.float32)
    for b, i in enumerate(rows):
        for k, (start, end) in enumerate(spans[i]):
            weights[k, b, start:end] = 1.0 / (end - start)
    return ids, roles, weights.to(device)


# ---------------------------------------------------------------------------------------------------- capture files


@dataclass(frozen=True)
class CaptureFile:
    """A capture read back by :func:`load_capture`: ``{reduction: [N, len(layers), hidden]}`` and where it came from."""

    tensors: dict[str, torch.Tensor]
    model_name: str
    layers: list[int]
    count: int
    source: str | None


def save_capture(
    path: str | Path,
    result: dict[str, torch.Tensor],
    *,
    model: Model,
    layers: Sequence[int] | None = None,
    source: str | None = None,
) -> Path:
    """Write a :func:`capture` result as safetensors (atomically; no pickle), with the model's name, the layers
    (``None``: all ``num_layers + 1``), the number of conversations and their source in the metadata."""
    from safetensors.torch import save_file

    from personascope.io import atomic_path

    if not result:
        raise PersonascopeError("nothing to save: the capture result is empty")
    count = {int(v.shape[0]) for v in result.values()}
    if len(count) != 1:
        raise PersonascopeError("every reduction of a capture must hold the same conversations")
    meta = {
        "format": "personascope-capture",
        "model_name": model.name,
        "layers": json.dumps(list(layers) if layers is not None else list(range(model.num_layers + 1))),
        "count": str(count.pop()),
    }
    if source is not None:
        meta["source"] = str(source)
    target = Path(path)
    with atomic_path(target) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in result.items()}, str(tmp), metadata=meta)
    return target


def load_capture(path: str | Path) -> CaptureFile:
    """Read a file written by :func:`save_capture` (or ``personascope capture``)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    source = Path(path)
    if not source.is_file():
        raise PersonascopeError(f"capture file not found: {source}")
    try:
        tensors = load_file(str(source))
        with safe_open(str(source), framework="pt") as fh:
            meta = fh.metadata() or {}
        layers = json.loads(meta["layers"])
        count = int(meta["count"])
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise PersonascopeError(
            f"{source} is not a personascope capture file ({type(exc).__name__}: {exc}); write one with "
            "`personascope capture` or personascope.residual.save_capture"
        ) from None
    return CaptureFile(tensors, str(meta.get("model_name", "")), [int(x) for x in layers], count, meta.get("source"))
