"""The CPU thread policy: how many torch threads a long command uses on a (possibly shared) machine."""

from __future__ import annotations

import os
from collections.abc import Callable

from personascope.errors import PersonascopeError


def set_threads(requested: int = 0, say: Callable[[str], None] | None = None) -> int:
    """Set torch's CPU thread count and return it.

    ``requested > 0`` uses exactly that many. ``0`` (automatic) keeps torch's default unless other work keeps the
    CPU busy: then it uses one thread per idle core (at least one), because on a shared CPU threads that wait for a
    pre-empted sibling at every small operation waste most of their time; ``say`` hears a note when that happens.
    """
    import torch

    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise PersonascopeError(f"--threads must be an integer >= 0 (0 = automatic), got {requested!r}")
    if requested > 0:
        torch.set_num_threads(requested)
        return requested
    try:
        busy = os.getloadavg()[0]
    except OSError:
        return torch.get_num_threads()
    idle = max(1, (os.cpu_count() or 1) - round(busy))
    if idle < torch.get_num_threads():
        torch.set_num_threads(idle)
        if say is not None:
            say(f"note: the CPU is busy (load {busy:.1f}); using {idle} torch thread(s) (set --threads)")
    return torch.get_num_threads()
