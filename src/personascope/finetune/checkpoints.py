"""Training checkpoints: trainable weights and optimizer state as safetensors (no pickle), for exact resume."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from personascope.errors import PersonascopeError


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def checkpoints(run_path: Path) -> list[Path]:
    folder = run_path / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-"))


def save_checkpoint(
    run_path: Path, step: int, named: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer
) -> Path:
    from safetensors.torch import save_file

    folder = run_path / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".partial-step-{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({n: p.detach().to("cpu").contiguous() for n, p in named}, str(tmp / "params.safetensors"))
    tensors, meta = _optimizer_to_flat(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "names": [n for n, _ in named], "optimizer": meta}))
    final = folder / f"step-{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(run_path):
        if old != final:
            shutil.rmtree(old)
    return final


def restore_checkpoint(
    run_path: Path, named: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer
) -> int:
    """Load the latest complete checkpoint into the parameters and optimizer; returns its step (0 if none)."""
    from safetensors.torch import load_file

    found = checkpoints(run_path)
    if not found:
        return 0
    latest = found[-1]
    try:
        info = json.loads((latest / "state.json").read_text())
        params = load_file(str(latest / "params.safetensors"))
        opt_tensors = load_file(str(latest / "optimizer.safetensors"))
    except (OSError, ValueError) as exc:
        raise PersonascopeError(
            f"checkpoint {latest} is unreadable ({exc}); pass --overwrite to start afresh"
        ) from None
    if info.get("names") != [n for n, _ in named]:
        raise PersonascopeError(f"checkpoint {latest} holds other parameters; pass --overwrite to start afresh")
    with torch.no_grad():
        for name, p in named:
            p.copy_(params[name].to(p.device, p.dtype))
    optimizer.load_state_dict(_optimizer_from_flat(opt_tensors, info["optimizer"]))
    return int(info["step"])
