from __future__ import annotations

import pytest
import torch

from personascope import runtime
from personascope.errors import PersonascopeError


def test_explicit_thread_counts_and_bad_values() -> None:
    assert runtime.set_threads(1) == 1 and torch.get_num_threads() == 1  # conftest restores the count afterwards
    for bad in (-1, 1.5, True):
        with pytest.raises(PersonascopeError, match="--threads must be an integer >= 0"):
            runtime.set_threads(bad)  # type: ignore[arg-type]


def test_automatic_uses_the_idle_cores_of_a_busy_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(2)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    said: list[str] = []
    assert runtime.set_threads(0, say=said.append) == 1  # 2 cores − round(1.2) busy = 1 idle
    assert said == ["note: the CPU is busy (load 1.2); using 1 torch thread(s) (set --threads)"]
    torch.set_num_threads(2)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    said.clear()
    assert runtime.set_threads(0, say=said.append) == 2 and said == []  # an idle machine keeps torch's count
