"""Run directories: a manifest, append-only JSONL records, named restartable steps, resume after a crash.

A run directory holds ``manifest.json`` (the config that defines the run, library versions, seeds, the model's
fingerprint, and the status of each step) and any number of ``NAME.jsonl`` record files. Records are appended
one line each, flushed and fsynced; every record carries a ``key``. Re-opening a run resumes it: a final line left
half-written by a crash (``kill -9``) is cut off on open, records are de-duplicated by key (first one wins), and
pipelines skip keys that are already done. ``overwrite=True`` starts afresh.

**Steps.** A pipeline that passes ``steps`` (a sequence of :class:`Step`, in order) is resumed step by step instead
of as a whole: each step declares the inputs its output depends on (besides the steps before it), and the manifest
records a digest of them chained through the earlier steps. Re-opening with changed inputs keeps every step before
the first changed one and sets aside the outputs of that step and all after it (moved to ``stale/<time>/``, never
deleted), so e.g. a new filter threshold re-filters without generating or judging again, while a new sampling
temperature redoes the rollouts. ``rerun_from="STEP"`` forces that step and the ones after it.
Without ``steps`` the whole config must match, as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personascope.errors import PersonascopeError
from personascope.io import atomic_open, atomic_path

MANIFEST = "manifest.json"

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """Versions of personascope, torch, transformers and Python, read from the installed distributions (no
    import of the package face or of torch, so a run directory stays a low-level room)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"

    return {
        "personascope": of("personascope"),
        "torch": of("torch"),
        "transformers": of("transformers"),
        "python": platform.python_version(),
    }


@dataclass(frozen=True)
class Step:
    """One named step of a pipeline: the JSON-serialisable ``inputs`` its output depends on (beyond the steps it
    comes after) and the ``outputs`` it writes, as paths relative to the run directory (``"rollouts.jsonl"``,
    ``"vectors"``, ``"finetune/x+steer"``), which are set aside when the step must run again."""

    name: str
    inputs: Mapping[str, Any] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    #: the steps whose results this one uses; ``None``: the step before it. Steps that do not depend on each other
    #: (e.g. screening data and finetuning on it) can then change without redoing each other.
    after: tuple[str, ...] | None = None


def _parse_record(line: bytes) -> dict[str, Any] | None:
    """A run record (a JSON object with a ``key``), or ``None`` for a damaged line."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "key" in record else None


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


class RunDir:
    """A resumable run directory. ``config`` must be JSON-serialisable; with ``steps`` (see the module docs) each
    step resumes on its own inputs, without them the whole ``config`` decides whether a run can resume. ``say``
    (e.g. ``print``) hears one line when steps run again (:meth:`describe_rerun`)."""

    def __init__(
        self,
        path: str | Path,
        config: Mapping[str, Any],
        *,
        overwrite: bool = False,
        kind: str = "run",
        steps: Sequence[Step] | None = None,
        rerun_from: str | None = None,
        say: Callable[[str], None] | None = None,
    ):
        self.path = Path(path)
        self.config = json.loads(json.dumps(dict(config)))
        self.steps = list(steps) if steps is not None else None
        #: steps whose outputs were set aside on open (their inputs changed, or ``rerun_from``), in order
        self.rerun: list[str] = []
        #: for each re-run step, the inputs that changed (empty when forced)
        self.changed: dict[str, list[str]] = {}
        #: line numbers of damaged records moved to ``NAME.jsonl.corrupt``, by record file name
        self.corrupt: dict[str, list[int]] = {}
        if self.steps is not None:
            names = [st.name for st in self.steps]
            if len(set(names)) != len(names):
                raise PersonascopeError(f"step names must be unique, got {names}")
            for k, st in enumerate(self.steps):
                unknown = [d for d in (st.after or ()) if d not in names[:k]]
                if unknown:
                    raise PersonascopeError(f"step {st.name} comes after {unknown}, which are not earlier steps")
            if rerun_from is not None and rerun_from not in names:
                raise PersonascopeError(f"unknown step '{rerun_from}' for --from; use one of {', '.join(names)}")
        elif rerun_from is not None:
            raise PersonascopeError("--from needs a pipeline with named steps")
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
            if (self.steps is None or not self._has_digests()) and old != self.config:
                diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
                hint = " or --from STEP to redo part of it" if self.steps is not None else ""
                raise PersonascopeError(
                    f"{self.path} holds a run with a different config ({', '.join(diff)} differ); "
                    f"pass --overwrite to start afresh{hint} or choose another --out"
                )
            if self.steps is not None and self.manifest.get("kind", kind) != kind:
                raise PersonascopeError(
                    f"{self.path} holds a {self.manifest.get('kind')} run, not a {kind} run; choose another --out"
                )
            self.manifest["config"] = self.config
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
        if self.steps is not None:
            self._reconcile(rerun_from)
        self.save_manifest()
        line = self.describe_rerun()
        if say is not None and line is not None:
            say(line)

    # ------------------------------------------------------------------ steps
    def _has_digests(self) -> bool:
        """Whether the manifest records step digests (older personascope versions wrote only statuses)."""
        return any(isinstance(v, dict) and "digest" in v for v in self.manifest.get("steps", {}).values())

    def _reconcile(self, rerun_from: str | None) -> None:
        """Record each step's input digest (chained through the steps it comes after); set aside the outputs of
        every step whose digest changed, or that was forced, and of every step after one of those."""
        assert self.steps is not None
        recorded: dict[str, Any] = self.manifest.setdefault("steps", {})
        legacy = bool(recorded) and not self._has_digests()  # an older run whose whole config matched
        digests: dict[str, str] = {}
        entries: list[tuple[Step, str, dict[str, Any]]] = []
        stale: list[Step] = []
        for k, st in enumerate(self.steps):
            inputs = json.loads(json.dumps(dict(st.inputs)))
            if st.after is None:  # after the step before it (a straight line)
                deps = [self.steps[k - 1].name] if k else []
                digest = _digest({"previous": digests[deps[0]] if deps else "", "inputs": inputs})
            else:
                deps = list(st.after)
                digest = _digest({"after": [digests[d] for d in deps], "inputs": inputs})
            digests[st.name] = digest
            entries.append((st, digest, inputs))
            if legacy:
                continue
            old = recorded.get(st.name)
            stale_names = {x.name for x in stale}
            if st.name == rerun_from:
                stale.append(st)
                self.changed[st.name] = []
            elif isinstance(old, dict) and old.get("digest") not in (None, digest):
                stale.append(st)
                before = old.get("inputs", {})
                own = sorted(x for x in set(before) | set(inputs) if before.get(x) != inputs.get(x))
                self.changed[st.name] = own or ["an earlier step"]
            elif any(d in stale_names for d in deps):
                stale.append(st)  # forced through an earlier step
                self.changed[st.name] = ["an earlier step"]
        if stale:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            aside = self.path / "stale" / stamp
            n = 1
            while aside.exists():
                n += 1
                aside = self.path / "stale" / f"{stamp}-{n}"
            for st in stale:
                self.rerun.append(st.name)
                recorded.pop(st.name, None)
                for name in st.outputs:
                    src = self.path / name
                    if src.exists():
                        (aside / name).parent.mkdir(parents=True, exist_ok=True)
                        os.replace(src, aside / name)
        for st, digest, inputs in entries:
            entry = recorded.setdefault(st.name, {"status": "pending"})
            entry["digest"], entry["inputs"] = digest, inputs

    def describe_rerun(self) -> str | None:
        """One line saying which steps run again and why (``None`` when nothing was set aside)."""
        if not self.rerun:
            return None
        first = self.rerun[0]
        changed = self.changed.get(first, [])
        why = f"{first}: {', '.join(changed)} changed" if changed else f"asked with --from {first}"
        where = self.path / "stale"
        return f"re-running {' → '.join(self.rerun)} ({why}); old outputs kept under {where}"

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
        steps = self.manifest.setdefault("steps", {})
        kept = {k: v for k, v in steps.get(name, {}).items() if k in ("digest", "inputs")}
        steps[name] = {"status": status, **info, **kept}
        self.save_manifest()

    def step_done(self, name: str) -> bool:
        return bool(self.manifest.get("steps", {}).get(name, {}).get("status") == "done")

    def file(self, name: str) -> Path:
        return self.path / name

    def records(self, name: str) -> list[dict[str, Any]]:
        """Records of ``NAME.jsonl`` de-duplicated by key (the first one wins).

        A final line cut short by a crash (no newline, not valid JSON) is removed from the file. A damaged line
        anywhere else is never dropped unseen: it is moved to ``NAME.jsonl.corrupt`` beside the file, a warning
        names its line number, and every valid record after it is kept (the pipeline redoes only what it lost).
        """
        path = self.path / f"{name}.jsonl"
        if not path.exists():
            return []
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline; else the last line, possibly torn
        kept: list[bytes] = []
        bad: list[tuple[int, bytes]] = []
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for number, line in enumerate([*lines, tail] if tail else lines, 1):
            if not line.strip():
                continue
            record = _parse_record(line)
            if record is None:
                if number == len(lines) + 1:
                    continue  # the torn final line of a crash: what was being written, lost with the crash
                bad.append((number, line))
                continue
            kept.append(line)
            key = str(record.get("key"))
            if key not in seen:
                seen.add(key)
                out.append(record)
        if bad or tail:
            if bad:
                corrupt = path.with_name(path.name + ".corrupt")
                with corrupt.open("ab") as fh:
                    fh.write(b"".join(line + b"\n" for _, line in bad))
                numbers = ", ".join(str(n) for n, _ in bad)
                log.warning(
                    "%s: line %s not a valid record; moved to %s (the %d valid records are kept)",
                    path,
                    numbers,
                    corrupt,
                    len(kept),
                )
                self.corrupt.setdefault(name, []).extend(n for n, _ in bad)
            with atomic_open(path, "wb") as fh:
                fh.write(b"".join(line + b"\n" for line in kept))
        return out

    def cached_tensors(
        self, name: str, inputs: Mapping[str, Any], compute: Callable[[], Mapping[str, Any]]
    ) -> dict[str, Any]:
        """Tensors stored in ``NAME.safetensors`` for exactly these ``inputs`` (a JSON-serialisable mapping of what
        they depend on), else ``compute()``'s tensors, written atomically first. The run's one tensor cache: a
        change of inputs (another model fingerprint, other tasks...) recomputes; no pickle is ever read."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import save_file

        path = self.path / f"{name}.safetensors"
        digest = _digest(json.loads(json.dumps(dict(inputs))))
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as fh:
                    if (fh.metadata() or {}).get("inputs_digest") == digest:
                        return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            except (SafetensorError, OSError):
                pass  # unreadable: computed again and replaced below
        tensors = {k: v.detach().cpu().contiguous() for k, v in compute().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"inputs_digest": digest, "inputs": json.dumps(dict(inputs))})
        return dict(tensors)

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
