"""The residual-stream engine: capture and interventions through one hook lifecycle.

Layer ``L`` is the residual stream after decoder block ``L-1`` (``L = 0``: the embedding output). See
:mod:`personascope.residual.hooks` for what ``L = num_layers`` means.
"""

from personascope.residual.capture import REDUCTIONS, CaptureFile, capture, capture_spans, load_capture, save_capture
from personascope.residual.hooks import add_site_hook, site_hooks
from personascope.residual.interventions import (
    Ablate,
    Add,
    Cap,
    Intervention,
    intervene,
    resolve_direction,
)
from personascope.residual.positions import POSITIONS, Positions, TokenSpans, token_roles
from personascope.residual.steering import Steering, steering

__all__ = [
    "POSITIONS",
    "REDUCTIONS",
    "Ablate",
    "Add",
    "Cap",
    "CaptureFile",
    "Intervention",
    "Positions",
    "Steering",
    "TokenSpans",
    "add_site_hook",
    "capture",
    "capture_spans",
    "intervene",
    "load_capture",
    "resolve_direction",
    "save_capture",
    "site_hooks",
    "steering",
    "token_roles",
]
