"""The task pool: short requests a user might give an assistant, whose pairwise preferences we elicit.

The shipped pool (``preferences/data/tasks.jsonl``) holds one-sentence tasks across topics from coding to
harmful requests, each with a fixed ``train``/``val``/``test`` split (about 70/15/15, stratified by topic). A user
pool is a JSONL file with one object per line: ``{"id": ..., "text": ..., "topic": ..., "split": ...}``; ``split``
may be left out, in which case it is assigned from a hash of the id (stable across runs and machines).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from personascope.errors import PersonascopeError

__all__ = ["SPLITS", "Task", "load_tasks", "split_tasks", "topics"]

#: Split names, in order.
SPLITS: tuple[str, ...] = ("train", "val", "test")
_REQUIRED = ("id", "text", "topic")


@dataclass(frozen=True)
class Task:
    """One task: a stable ``id``, the request ``text``, its ``topic`` and its ``split`` (train/val/test)."""

    id: str
    text: str
    topic: str
    split: str


def _hash_split(task_id: str) -> str:
    """Deterministic 70/15/15 split from the id's SHA-256 (not Python's salted ``hash``)."""
    bucket = int.from_bytes(hashlib.sha256(task_id.encode("utf-8")).digest()[:8], "big") % 100
    if bucket < 70:
        return "train"
    return "val" if bucket < 85 else "test"


def _shipped() -> Traversable:
    return resources.files("personascope.preferences").joinpath("data", "tasks.jsonl")


def load_tasks(path: str | Path | None = None) -> list[Task]:
    """Load a task pool: the shipped one (``path=None``) or a JSONL file.

    Raises:
        PersonascopeError: one line naming the file (and line number) for an unreadable or empty file, a line
            that is not a JSON object, a missing or empty ``id``/``text``/``topic``, an unknown ``split`` or
            duplicate ids.
    """
    if path is None:
        source: Traversable | Path = _shipped()
        name = "the shipped task pool"
    else:
        source = Path(path)
        name = str(path)
        if not source.is_file():
            raise PersonascopeError(f"task file {name} does not exist; pass the path of a JSONL task file")
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PersonascopeError(f"cannot read task file {name}: {exc}; check the path and that it is UTF-8") from exc
    tasks: list[Task] = []
    first_line: dict[str, int] = {}
    duplicates: dict[str, list[int]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PersonascopeError(f"{where}: not valid JSON ({exc.msg}); write one JSON object per line") from None
        if not isinstance(obj, dict):
            raise PersonascopeError(f"{where}: expected a JSON object, got {type(obj).__name__}; write one per line")
        for key in _REQUIRED:
            value = obj.get(key)
            if not isinstance(value, str) or not value.strip():
                problem = "is missing" if key not in obj else "must be a non-empty string"
                raise PersonascopeError(f'{where}: "{key}" {problem}; each task needs "id", "text" and "topic"')
        task_id = obj["id"].strip()
        split = obj.get("split")
        if split is None:
            split = _hash_split(task_id)
        elif split not in SPLITS:
            raise PersonascopeError(f'{where}: unknown split {split!r}; use "train", "val" or "test" (or leave it out)')
        if task_id in first_line:
            duplicates.setdefault(task_id, [first_line[task_id]]).append(lineno)
        else:
            first_line[task_id] = lineno
        tasks.append(Task(id=task_id, text=obj["text"].strip(), topic=obj["topic"].strip(), split=split))
    if duplicates:
        listed = ", ".join(f"{k} (lines {', '.join(map(str, v))})" for k, v in list(duplicates.items())[:5])
        more = f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
        raise PersonascopeError(f"{name}: duplicate task ids {listed}{more}; give every task a unique id")
    if not tasks:
        raise PersonascopeError(f"{name} holds no tasks; add one JSON object per line")
    return tasks


def split_tasks(tasks: list[Task]) -> dict[str, list[Task]]:
    """Group tasks by split; the result always has the keys ``train``, ``val`` and ``test`` (in that order)."""
    out: dict[str, list[Task]] = {s: [] for s in SPLITS}
    for task in tasks:
        if task.split not in out:
            raise PersonascopeError(f"task {task.id} has unknown split {task.split!r}; use train, val or test")
        out[task.split].append(task)
    return out


def topics(tasks: list[Task]) -> list[str]:
    """The distinct topics, sorted."""
    return sorted({t.topic for t in tasks})
