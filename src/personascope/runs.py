"""Run directories: a manifest, append-only JSONL records, resume after a crash.

A run directory holds ``manifest.json`` (the config that defines the run, library versions, seeds, the model's
fingerprint, and the status of each step) and any number of ``NAME.jsonl`` record files. Records are appended
one line each, flushed and fsynced; every record carries a ``key``. Re-opening a run with the same config resumes
it: a final line left half-written by a crash (``kill -9``) is cut off on open, records are de-duplicated by key
(first one wins), and pipelines skip keys that are already done. ``overwrite=True`` starts afresh.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from personascope.errors import PersonascopeError
from personascope.io import atomic_open

MANIFEST = "manifest.json"


def versions() -> dict[str, str]:
    import torch
    import transformers

    from personascope import __version__

    return {
        "personascope": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


class RunDir:
    """A resumable run directory. ``config`` must be JSON-serialisable; it decides whether a run can resume."""

    def __init__(self, path: str | Path, config: Mapping[str, Any], *, overwrite: bool = False, kind: str = "run"):
        self.path = Path(path)
        self.config = json.loads(json.dumps(dict(config)))
        manifest_path = self.path / MANIFEST
        if self.path.exists() and overwrite:
            if manifest_path.is_file() or not any(self.path.iterdir()):
                shutil.rmtree(self.path)
            else:
                raise PersonascopeError(
                    f"{self.path} exists and is not a personascope run directory; refusing to overwrite it"
                )
        if manifest_path.is_file():
            self.manifest = self._read_manifest(manifest_path)
            old = self.manifest.get("config", {})
            if old != self.config:
                diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
                raise PersonascopeError(
                    f"{self.path} holds a run with a different config ({', '.join(diff)} differ); "
                    "pass --overwrite to start afresh or choose another --out"
                )
            self.manifest["resumed"] = int(self.manifest.get("resumed", 0)) + 1
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise PersonascopeError(f"{self.path} exists, is not empty and has no {MANIFEST}; choose another --out")
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = {
                "kind": kind,
                "config": self.config,
                "versions": versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "steps": {},
                "resumed": 0,
            }
        self.save_manifest()

    @staticmethod
    def _read_manifest(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise PersonascopeError(f"{path} is not valid JSON; pass --overwrite to start the run afresh") from None
        if not isinstance(data, dict):
            raise PersonascopeError(f"{path} is not a run manifest; pass --overwrite to start afresh")
        return data

    def save_manifest(self) -> None:
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with atomic_open(self.path / MANIFEST) as fh:
            json.dump(self.manifest, fh, indent=2, sort_keys=True)

    def note(self, key: str, value: Any) -> None:
        """Store a JSON value in the manifest (e.g. the model fingerprint, output files)."""
        self.manifest[key] = value
        self.save_manifest()

    def step(self, name: str, status: str, **info: Any) -> None:
        self.manifest.setdefault("steps", {})[name] = {"status": status, **info}
        self.save_manifest()

    def step_done(self, name: str) -> bool:
        return bool(self.manifest.get("steps", {}).get(name, {}).get("status") == "done")

    def file(self, name: str) -> Path:
        return self.path / name

    def records(self, name: str) -> list[dict[str, Any]]:
        """Records of ``NAME.jsonl`` de-duplicated by key; a torn final line is removed from the file."""
        path = self.path / f"{name}.jsonl"
        if not path.exists():
            return []
        raw = path.read_bytes()
        good_end = 0
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        pos = 0
        while pos < len(raw):
            newline = raw.find(b"\n", pos)
            if newline < 0:
                break  # a final line without newline: torn by a crash
            line = raw[pos:newline]
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn line; what follows cannot be trusted either
            pos = newline + 1
            good_end = pos
            key = str(record.get("key"))
            if key not in seen:
                seen.add(key)
                out.append(record)
        if good_end < len(raw):
            with path.open("r+b") as fh:
                fh.truncate(good_end)
        return out

    def done_keys(self, name: str) -> set[str]:
        return {str(r["key"]) for r in self.records(name)}

    def append(self, name: str, records: Iterable[Mapping[str, Any]]) -> int:
        """Append records (each must have a ``key``) durably; returns how many were written."""
        lines = []
        for record in records:
            if "key" not in record:
                raise ValueError("every run record needs a 'key'")
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        if not lines:
            return 0
        with (self.path / f"{name}.jsonl").open("a", encoding="utf-8") as fh:
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
        return len(lines)
