"""Small file helpers shared by the CLI and pipelines: atomic writes and validated JSONL readers."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from personascope.errors import PersonascopeError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The file ends up with the permissions a plain ``open(path, "w")`` would give it (``0o666`` less the umask), not
    the owner-only mode of a temporary file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
        yield fh


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """``(line_number, object)`` for each non-blank line; malformed lines are errors with their line number."""
    source = Path(path)
    if not source.is_file():
        raise PersonascopeError(f"input file not found: {source}")
    rows: list[tuple[int, Any]] = []
    with source.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise PersonascopeError(
                    f"{source}:{number}: not valid JSON ({exc.msg}); fix or remove the line"
                ) from None
    if not rows:
        raise PersonascopeError(f"{source} is empty; give one conversation per line")
    return rows


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations from JSONL: each line ``{"messages": [...]}`` or a bare list of messages."""
    from personascope.models.chat import validate_conversation  # here, so that io itself imports no other room

    out = []
    for number, obj in read_jsonl(path):
        messages = obj.get("messages") if isinstance(obj, dict) else obj
        if messages is None:
            raise PersonascopeError(f'{path}:{number}: expected {{"messages": [...]}} or a list of messages')
        out.append(validate_conversation(messages, f"{path}:{number}"))
    return out
