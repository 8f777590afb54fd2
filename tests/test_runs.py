from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import personascope
from personascope.errors import PersonascopeError
from personascope.runs import RunDir, Step


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


# The test makes the run directories, so the writers only ever resume them. A writer skips personascope/__init__.py
# (it imports torch: seconds per process) and loads runs.py, which needs only errors.py and io.py, from the package.
WRITER = """
import sys, types
package = types.ModuleType("personascope")
package.__path__ = [sys.argv[3]]
sys.modules["personascope"] = package
from personascope.runs import RunDir, Step
run = RunDir(sys.argv[1], {"job": "w"})
done = run.done_keys("rec")
for i in range(int(sys.argv[2])):
    key = f"k{i}"
    if key not in done:
        run.append("rec", [{"key": key, "payload": "x" * 500}])
"""
N_RECORDS = 1000
LINE = len(json.dumps({"key": "k1000", "payload": "x" * 500}) + "\n")


def _writer(target: Path) -> subprocess.Popen[bytes]:
    package = str(Path(personascope.__file__).parent)
    return subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(N_RECORDS), package])


def _finish(proc: subprocess.Popen[bytes], what: str, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the {what} writer did not finish within {timeout:.0f} s")


def test_kill_minus_9_then_resume_has_no_duplicates_or_truncation(tmp_path: Path) -> None:
    target, reference = tmp_path / "run", tmp_path / "reference"
    RunDir(target, {"job": "w"})
    RunDir(reference, {"job": "w"})
    victim, uninterrupted = _writer(target), _writer(reference)
    restart: subprocess.Popen[bytes] | None = None
    try:
        path = target / "rec.jsonl"
        deadline = time.monotonic() + 120
        while not (path.exists() and path.stat().st_size > N_RECORDS // 4 * LINE):
            assert victim.poll() is None, f"the writer exited ({victim.returncode}) before it could be killed"
            assert time.monotonic() < deadline, "the writer wrote too little within 120 s"
            time.sleep(0.01)
        os.kill(victim.pid, signal.SIGKILL)
        assert _finish(victim, "killed") == -signal.SIGKILL, "the writer finished before it was killed"

        # what the kill left: whole records k0..k{n-1}, then at most part of the line for k{n}
        raw = path.read_bytes()
        whole, _, torn = raw.rpartition(b"\n")
        keys = [json.loads(line)["key"] for line in whole.splitlines()]
        assert 0 < len(keys) < N_RECORDS
        assert keys == [f"k{i}" for i in range(len(keys))]
        next_line = json.dumps({"key": f"k{len(keys)}", "payload": "x" * 500}).encode()
        assert next_line.startswith(torn)

        restart = _writer(target)  # it cuts the torn line and writes the rest
        assert _finish(restart, "resumed") == 0
        assert _finish(uninterrupted, "uninterrupted") == 0
    finally:
        for proc in (victim, uninterrupted, restart):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    resumed = RunDir(target, {"job": "w"})
    assert resumed.manifest["resumed"] == 3  # the killed writer, the restarted one, then this
    records = resumed.records("rec")
    assert [r["key"] for r in records] == [f"k{i}" for i in range(N_RECORDS)]
    assert records == RunDir(reference, {"job": "w"}).records("rec")
    assert path.read_bytes() == (reference / "rec.jsonl").read_bytes()


def test_the_tensor_cache_recomputes_only_when_its_inputs_change(tmp_path: Path) -> None:
    import torch

    run = RunDir(tmp_path / "r", {"a": 1})
    calls: list[int] = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"x": torch.arange(6.0).view(2, 3) * len(calls)}

    first = run.cached_tensors("acts", {"model": "m1", "tasks": [1, 2]}, compute)
    again = run.cached_tensors("acts", {"tasks": [1, 2], "model": "m1"}, compute)  # same inputs, other key order
    assert len(calls) == 1 and torch.equal(first["x"], again["x"])
    other = run.cached_tensors("acts", {"model": "m2", "tasks": [1, 2]}, compute)
    assert len(calls) == 2 and torch.equal(other["x"], torch.arange(6.0).view(2, 3) * 2)
    (tmp_path / "r" / "acts.safetensors").write_bytes(b"torn")  # an unreadable cache is recomputed, not trusted
    assert torch.equal(run.cached_tensors("acts", {"model": "m2", "tasks": [1, 2]}, compute)["x"], other["x"] * 1.5)
    assert len(calls) == 3


def _steps(**inputs: int) -> list[Step]:
    return [
        Step("a", {"x": inputs.get("a", 0)}, ("a.jsonl",)),
        Step("b", {"x": inputs.get("b", 0)}, ("b.jsonl",), after=("a",)),
        Step("c", {"x": inputs.get("c", 0)}, ("c.jsonl",), after=("a",)),
        Step("d", {"x": inputs.get("d", 0)}, ("out/d.jsonl",), after=("b", "c")),
    ]


def _fill(run: RunDir) -> None:
    (run.path / "out").mkdir(exist_ok=True)
    for name in ("a", "b", "c", "out/d"):
        if not (run.path / f"{name}.jsonl").exists():
            (run.path / f"{name}.jsonl").write_text(f"{name} {run.manifest['resumed']}\n")


def test_steps_rerun_what_depends_on_a_change_and_nothing_else(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r", {"k": 1}, steps=_steps())
    assert run.rerun == []
    _fill(run)
    same = RunDir(tmp_path / "r", {"k": 1}, steps=_steps())
    assert same.rerun == [] and not (tmp_path / "r" / "stale").exists()
    changed_c = RunDir(tmp_path / "r", {"k": 2}, steps=_steps(c=1))  # the config may change with the steps
    assert changed_c.rerun == ["c", "d"] and changed_c.changed == {"c": ["x"], "d": ["an earlier step"]}
    assert (tmp_path / "r" / "b.jsonl").read_text() == "b 0\n"  # b does not use c: kept
    assert not (tmp_path / "r" / "c.jsonl").exists() and not (tmp_path / "r" / "out" / "d.jsonl").exists()
    (aside,) = (tmp_path / "r" / "stale").iterdir()
    assert (aside / "c.jsonl").read_text() == "c 0\n" and (aside / "out" / "d.jsonl").read_text() == "out/d 0\n"
    assert changed_c.describe_rerun() == (
        f"re-running c → d (c: x changed); old outputs kept under {tmp_path / 'r' / 'stale'}"
    )
    _fill(changed_c)
    forced = RunDir(tmp_path / "r", {"k": 2}, steps=_steps(c=1), rerun_from="b")
    assert forced.rerun == ["b", "d"] and (tmp_path / "r" / "c.jsonl").read_text() == "c 2\n"
    first = RunDir(tmp_path / "r", {"k": 2}, steps=_steps(a=5, c=1))
    assert first.rerun == ["a", "b", "c", "d"]
    with pytest.raises(PersonascopeError, match="unknown step 'e'"):
        RunDir(tmp_path / "r", {"k": 2}, steps=_steps(), rerun_from="e")
    with pytest.raises(PersonascopeError, match="not earlier steps"):
        RunDir(tmp_path / "s", {}, steps=[Step("a", after=("b",)), Step("b")])
    assert not (tmp_path / "s").exists()  # refused before anything is written


def test_a_damaged_middle_record_is_kept_aside_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = RunDir(tmp_path / "r", {"a": 1})
    run.append("rec", [{"key": f"k{i}", "v": i} for i in range(5)])
    path = tmp_path / "r" / "rec.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = '{"key": "k2", "v": 2, "oops\n'  # damaged in the middle (a bad disk block, a stray edit)
    lines.insert(4, '["not", "a", "record"]\n')  # valid JSON, but not a record
    path.write_text("".join(lines) + '{"key": "k9", "v')  # and a final line torn by a crash
    with caplog.at_level("WARNING", logger="personascope.runs"):
        records = RunDir(tmp_path / "r", {"a": 1}).records("rec")
    assert [r["key"] for r in records] == ["k0", "k1", "k3", "k4"]  # everything valid after the damage is kept
    (message,) = [r.getMessage() for r in caplog.records]
    assert "rec.jsonl: line 3, 5 not a valid record; moved to" in message and "rec.jsonl.corrupt" in message
    corrupt = (tmp_path / "r" / "rec.jsonl.corrupt").read_text().splitlines()
    assert corrupt == ['{"key": "k2", "v": 2, "oops', '["not", "a", "record"]']
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == ["k0", "k1", "k3", "k4"]
    again = RunDir(tmp_path / "r", {"a": 1})
    assert again.records("rec") == records and again.corrupt == {}  # reported once: the file is clean now


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r", {"a": 1})
    run.append("rec", [{"key": "a"}])
    with (tmp_path / "r" / "rec.jsonl").open("a") as fh:
        fh.write('{"key": "b"}')  # the crash came between the record and its newline
    assert [r["key"] for r in run.records("rec")] == ["a", "b"]
    assert (tmp_path / "r" / "rec.jsonl").read_text() == '{"key": "a"}\n{"key": "b"}\n'
