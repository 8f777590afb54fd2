from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from personascope.errors import PersonascopeError
from personascope.runs import RunDir


def test_manifest_and_append(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r", {"a": 1}, kind="test")
    assert run.append("rec", [{"key": "x", "v": 1}, {"key": "y", "v": 2}]) == 2
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["config"] == {"a": 1} and manifest["kind"] == "test"
    assert {"personascope", "torch", "transformers", "python"} <= set(manifest["versions"])
    assert [r["key"] for r in run.records("rec")] == ["x", "y"]
    with pytest.raises(ValueError, match="key"):
        run.append("rec", [{"v": 3}])


def test_resume_dedupes_and_cuts_a_torn_line(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r", {"a": 1})
    run.append("rec", [{"key": "x", "v": 1}])
    with (tmp_path / "r" / "rec.jsonl").open("a") as fh:
        fh.write('{"key": "x", "v": 99}\n{"key": "y", "v"')  # a duplicate, then a line torn by a crash
    again = RunDir(tmp_path / "r", {"a": 1})
    assert again.manifest["resumed"] == 1
    assert again.records("rec") == [{"key": "x", "v": 1}]
    again.append("rec", [{"key": "y", "v": 2}])
    assert [r["v"] for r in again.records("rec")] == [1, 2]
    assert (tmp_path / "r" / "rec.jsonl").read_text().count("\n") == 3


def test_config_change_needs_overwrite(tmp_path: Path) -> None:
    RunDir(tmp_path / "r", {"a": 1, "b": 2}).append("rec", [{"key": "k"}])
    with pytest.raises(PersonascopeError, match=r"\(b differ\).*--overwrite"):
        RunDir(tmp_path / "r", {"a": 1, "b": 3})
    fresh = RunDir(tmp_path / "r", {"a": 1, "b": 3}, overwrite=True)
    assert fresh.records("rec") == []


def test_refuses_foreign_folders(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(PersonascopeError, match="not empty"):
        RunDir(tmp_path / "mine", {})
    with pytest.raises(PersonascopeError, match="refusing to overwrite"):
        RunDir(tmp_path / "mine", {}, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").exists()


WRITER = """
import sys, time
from personascope.runs import RunDir
run = RunDir(sys.argv[1], {"job": "w"})
done = run.done_keys("rec")
for i in range(100000):
    key = f"k{i}"
    if key not in done:
        run.append("rec", [{"key": key, "payload": "x" * 500}])
"""


def test_kill_minus_9_then_resume_has_no_duplicates_or_truncation(tmp_path: Path) -> None:
    target = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
    deadline = time.time() + 60
    while time.time() < deadline:
        path = target / "rec.jsonl"
        if path.exists() and path.stat().st_size > 200_000:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = RunDir(target, {"job": "w"})
    records = run.records("rec")
    assert records, "the writer wrote nothing before it was killed"
    keys = [r["key"] for r in records]
    assert keys == [f"k{i}" for i in range(len(keys))]
    assert all(r["payload"] == "x" * 500 for r in records)
    raw = (target / "rec.jsonl").read_bytes()
    assert raw.endswith(b"\n") and all(json.loads(line) for line in raw.splitlines())
