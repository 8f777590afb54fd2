"""Monitoring: project activations onto a persona vector, before the model speaks and turn by turn.

``project`` is the paper's monitor: the projection of the last prompt token's activation on the unit persona
direction predicts how strongly the coming answer will show the trait. It runs through capture's projection mode,
so memory stays at ``N × layers`` scalars however large the input.

``monitor_turns`` watches a conversation drift: for every assistant reply it reports the projection at the last
token before the reply (the end of the assistant header: the model is about to answer, having read every earlier
turn) and the mean projection over the reply's own tokens; a trailing user turn without a reply gets the first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from personascope.errors import PersonascopeError
from personascope.models.chat import Conversation, FormattedConversation
from personascope.residual.capture import capture, capture_spans, format_all
from personascope.residual.steering import chosen_layers, require_chosen_layer
from personascope.vectors import PersonaVector

if TYPE_CHECKING:
    from personascope.models.loading import Model

At = Literal["prompt_last", "response_mean", "prompt_mean"]


def project(
    model: Model,
    conversations: Sequence[Conversation | FormattedConversation],
    vector: PersonaVector,
    layers: Sequence[int] | None = None,
    at: At = "prompt_last",
    batch_size: int = 16,
    progress: bool | None = None,
) -> torch.Tensor:
    """Projection on the unit persona direction, ``[N, len(layers)]`` (all layers by default).

    Layers where the vector is zero (a contrast of two prompts ending in the same token is zero at layer 0) give
    NaN, so a projection over all layers works for any vector with a direction somewhere."""
    vector.check_compatible(model)
    out = capture(
        model,
        conversations,
        reductions=[at],
        layers=layers,
        batch_size=batch_size,
        directions=vector,
        progress=progress,
    )
    return out[at][..., 0]


@dataclass(frozen=True)
class TurnProjection:
    conversation: int
    turn: int  # index of the user turn (0-based) the row belongs to
    kind: str  # "prompt_last" (before the reply) or "reply_mean"
    layer: int
    projection: float
    text: str  # the user message (prompt_last) or the reply (reply_mean), for reading the output


def turn_spans(conv: FormattedConversation) -> list[tuple[int, str, tuple[int, int]]]:
    """``(turn, kind, span)`` for every assistant reply (and a trailing user turn) of a formatted conversation."""
    out: list[tuple[int, str, tuple[int, int]]] = []
    turn = -1
    for m in conv.messages:
        if m.role == "user":
            turn += 1
        elif m.role == "assistant":
            if turn < 0:
                raise PersonascopeError("an assistant message comes before any user message")
            out.append((turn, "prompt_last", (m.start - 1, m.start)))
            if m.end > m.start:
                out.append((turn, "reply_mean", (m.start, m.end)))
    if conv.messages and conv.messages[-1].role == "user":
        out.append((turn, "prompt_last", (len(conv) - 1, len(conv))))
    return out


def monitor_turns(
    model: Model,
    conversations: Sequence[Conversation],
    vector: PersonaVector,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
) -> list[TurnProjection]:
    """One row per conversation, turn, kind and layer (see the module docstring)."""
    vector.check_compatible(model)
    layers_given = list(layers) if layers is not None else None
    layer_list = chosen_layers(model, vector, layers_given, flag="--layer", python="layers")
    formatted = format_all(model, conversations)
    rows: list[TurnProjection] = []
    for i, (conv, fc) in enumerate(zip(conversations, formatted, strict=True)):
        spans = turn_spans(fc)
        proj = capture_spans(
            model,
            [fc],
            [[s for _, _, s in spans]],
            layers=layer_list,
            directions=vector,
            batch_size=batch_size,
            progress=False,
        )[0, :, :, 0]
        users = [m["content"] for m in conv if m["role"] == "user"]
        replies = [m["content"] for m in conv if m["role"] == "assistant"]
        reply_index = 0
        for k, (turn, kind, _) in enumerate(spans):
            text = users[turn] if kind == "prompt_last" else replies[reply_index]
            if kind == "reply_mean":
                reply_index += 1
            for j, layer in enumerate(layer_list):
                rows.append(TurnProjection(i, turn, kind, layer, float(proj[k, j]), text))
    return rows


def write_rows(rows: Sequence[TurnProjection], path: str | Path) -> Path:
    """CSV or JSONL by the file's suffix, written atomically."""
    import csv
    import json

    from personascope.io import atomic_open

    target = Path(path)
    if target.suffix not in (".csv", ".jsonl"):
        raise PersonascopeError(f"--out must end in .csv or .jsonl, got '{target.name}'")
    with atomic_open(target) as fh:
        if target.suffix == ".csv":
            writer = csv.DictWriter(fh, fieldnames=list(TurnProjection.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
        else:
            for r in rows:
                fh.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
    return target


def monitor_file(
    vector: str | Path | PersonaVector,
    conversations: str | Path,
    out: str | Path,
    *,
    model: str | Model = "smollm2-135m-instruct",
    layers: Sequence[int] | None = None,
    plot: str | Path | None = None,
    device: str | None = None,
) -> list[TurnProjection]:
    """``personascope monitor`` as a function: per-turn projections of a JSONL file of conversations, written to
    ``out`` (.csv or .jsonl) and optionally plotted (``plot``, a .png).

    Everything that can be checked without the model is checked first (the vector, the conversations, the output
    suffixes, a layer to use), so a mistake costs no model load and leaves nothing on disk.
    """
    from personascope.io import read_conversations
    from personascope.models import load_model

    vec = vector if isinstance(vector, PersonaVector) else PersonaVector.load(vector)
    convs = read_conversations(conversations)
    if Path(out).suffix not in (".csv", ".jsonl"):
        raise PersonascopeError(f"--out must end in .csv or .jsonl, got '{Path(out).name}'")
    if plot is not None and Path(plot).suffix != ".png":
        raise PersonascopeError(f"--plot must end in .png, got '{Path(plot).name}'")
    if not layers:
        source = None if isinstance(vector, PersonaVector) else str(vector)
        require_chosen_layer(vec, source=source, flag="--layer", python="layers")
    m = load_model(model, device=device) if isinstance(model, str) else model
    vec.check_compatible(m)
    rows = monitor_turns(m, convs, vec, layers=list(layers) if layers else None)
    write_rows(rows, out)
    if plot is not None:
        from personascope.report.plots import plot_turns

        plot_turns(rows, plot, title=f"{vec.trait or 'persona'} projection per turn")
    return rows
