"""The run's cached tensors (task activations per persona, task embeddings) go through ``RunDir.cached_tensors``."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from personascope.errors import PersonascopeError
from personascope.preferences.prompt import task_conversation
from personascope.preferences.steps.run import (
    ElicitConfig,
    create_run,
    open_run,
    task_activations,
    task_embeddings,
)
from personascope.testing import tiny_model

# the module (``personascope.residual.capture`` as an attribute is the function the package re-exports)
capture_module = importlib.import_module("personascope.residual.capture")


def _counting_capture(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], Callable[..., dict[str, torch.Tensor]]]:
    """Count the conversations each ``capture`` call gets; also return the real ``capture``."""
    calls: list[int] = []
    real = capture_module.capture

    def counted(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(capture_module, "capture", counted)
    return calls, real


def _inputs(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    return dict(json.loads(meta["inputs"]))


def test_task_activations_are_cached_per_model_and_persona(llama, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls, real = _counting_capture(monkeypatch)
    prefs = create_run(ElicitConfig(personas=["assistant", "evil"], n_tasks=6), tmp_path / "run")
    assistant, evil = prefs.personas
    first = task_activations(prefs, llama, assistant)
    assert calls == [6]
    convs = [task_conversation(t.text, assistant.system_prompt) for t in prefs.tasks]
    reference = real(llama, convs, reductions=["prompt_last"])["prompt_last"]
    torch.testing.assert_close(first, reference, atol=1e-5, rtol=1e-5)
    calls.clear()
    again = task_activations(open_run(tmp_path / "run"), llama, assistant)  # read back: no forward pass
    assert calls == [] and torch.equal(again, first)
    inputs = _inputs(tmp_path / "run" / "activations-assistant.safetensors")
    assert set(inputs) == {"model_fingerprint", "tasks_sha", "system_prompt_sha", "reduction"}
    assert inputs["model_fingerprint"] == llama.fingerprint() and inputs["reduction"] == "prompt_last"
    task_activations(prefs, llama, evil)  # another persona: its own file
    assert calls == [6] and (tmp_path / "run" / "activations-evil.safetensors").is_file()
    calls.clear()
    other = tiny_model("llama", seed=5)  # another model: computed again, in place
    assert not torch.equal(task_activations(prefs, other, assistant), first) and calls == [6]
    assert _inputs(tmp_path / "run" / "activations-assistant.safetensors")["model_fingerprint"] == other.fingerprint()


def test_old_format_cache_files_are_recomputed(llama, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    prefs = create_run(ElicitConfig(n_tasks=4), tmp_path / "run")
    path = tmp_path / "run" / "activations-assistant.safetensors"
    save_file({"prompt_last": torch.zeros(4, 2, 3)}, str(path), metadata={"reduction": "prompt_last"})
    calls, _ = _counting_capture(monkeypatch)
    acts = task_activations(prefs, llama, prefs.personas[0])
    assert calls == [4] and acts.shape == (4, llama.num_layers + 1, llama.hidden_size)


def test_task_embeddings_are_cached_per_embedder(tmp_path: Path) -> None:
    prefs = create_run(ElicitConfig(n_tasks=5), tmp_path / "run")
    seen: list[int] = []

    def embed(texts: list[str]) -> np.ndarray:
        seen.append(len(texts))
        return np.arange(len(texts) * 3, dtype=np.float64).reshape(len(texts), 3)

    emb = task_embeddings(prefs, embed)
    assert emb.dtype == np.float64 and emb.shape == (5, 3) and seen == [5]
    np.testing.assert_array_equal(task_embeddings(prefs, embed), emb)
    assert seen == [5]
    assert _inputs(tmp_path / "run" / "embeddings.safetensors") == {
        "tasks_sha": prefs.run.config["tasks_sha"],
        "embedder": "custom",
    }
    with pytest.raises(PersonascopeError, match="the embedder returned shape"):
        task_embeddings(create_run(ElicitConfig(n_tasks=5), tmp_path / "other"), lambda texts: np.zeros(3))
    assert not (tmp_path / "other" / "embeddings.safetensors").exists()
