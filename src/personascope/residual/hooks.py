"""The hook lifecycle: one place that attaches functions to the residual stream at a layer.

A *site function* receives the residual stream at layer ``L`` (``[batch, seq, hidden]``) and returns a replacement
or ``None``. Layer ``L >= 1`` is the output of decoder block ``L-1`` (a forward hook on that block); layer ``0`` is
the embedding output, reached as the input of block ``0`` (a forward pre-hook), which is exactly what Hugging Face
records as ``hidden_states[0]`` for every architecture (GPT-2's position embeddings included). Capturing at ``L`` and
steering at ``L`` therefore touch the same tensor.

Layer ``num_layers`` is the output of the last block *before* the final norm; Hugging Face's
``hidden_states[num_layers]`` is taken *after* the final norm, so the two differ there, and only there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from personascope.models.loading import Model

SiteFn = Callable[[torch.Tensor], torch.Tensor | None]


def add_site_hook(model: Model, layer: int, fn: SiteFn, *, prepend: bool = False) -> RemovableHandle:
    """Attach ``fn`` to the residual stream at ``layer``; returns the handle that removes it.

    ``prepend=True`` makes it run before hooks already attached at the same site (interventions use it, so that
    captures always see the stream after every active intervention).
    """
    model.check_layer(layer)
    if layer == 0:
        return model.layers[0].register_forward_pre_hook(_pre_hook(fn), with_kwargs=True, prepend=prepend)
    return model.layers[layer - 1].register_forward_hook(_post_hook(fn), prepend=prepend)


def _pre_hook(fn: SiteFn) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


def _post_hook(fn: SiteFn) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if isinstance(output, tuple | list):
            new = fn(output[0])
            return None if new is None else type(output)((new, *output[1:]))
        new = fn(output)
        return new

    return hook


@contextmanager
def site_hooks(model: Model, fns: dict[int, SiteFn], *, prepend: bool = False) -> Iterator[None]:
    """Attach several site functions; all are removed on exit, also on exceptions."""
    with ExitStack() as stack:
        for layer, fn in fns.items():
            handle = add_site_hook(model, layer, fn, prepend=prepend)
            stack.callback(handle.remove)
        yield
