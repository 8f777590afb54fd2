from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from personascope.vectors import PersonaVector
from tests.cli.helpers import one_line_error, run, save_tiny
from tests.conftest import CONV, SHORT


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-model"))


def test_models_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "gemma-3-270m" in out


def test_capture_writes_safetensors(tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "convs.jsonl"
    src.write_text(json.dumps({"messages": CONV}) + "\n\n" + json.dumps(SHORT) + "\n")
    out = tmp_path / "acts.safetensors"
    code = run(["capture", "-m", str(model_dir), "-i", str(src), "-o", str(out), "--layers", "0,2"])
    assert code == 0, capsys.readouterr().err
    tensors = load_file(str(out))
    assert tensors["response_mean"].shape == (2, 2, 32)


@pytest.mark.parametrize(
    ("content", "extra", "needle"),
    [
        ("", [], "is empty"),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n',
            ["--reductions", "prompt_last"],
            ":2: not valid JSON",
        ),
        ('{"text": "hi"}\n', [], ':1: expected {"messages"'),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', [], "needs a trailing assistant message"),
        (json.dumps({"messages": CONV}) + "\n", ["--layers", "9"], "out of range"),
        (json.dumps({"messages": CONV}) + "\n", ["--layers", "a,b"], "comma-separated integers"),
    ],
)
def test_capture_bad_input(tmp_path, model_dir, capsys, content, extra, needle) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    out = tmp_path / "acts.safetensors"
    code = run(["capture", "-m", str(model_dir), "-i", str(src), "-o", str(out), *extra])
    one_line_error(capsys, code, needle)
    assert list(tmp_path.iterdir()) == [src]  # nothing half-written


def test_generate_with_and_without_a_vector(tmp_path, model_dir, capsys) -> None:  # type: ignore[no-untyped-def]
    assert run(["generate", "-m", str(model_dir), "-p", "Hi", "--max-new-tokens", "5"]) == 0
    plain = capsys.readouterr().out
    vec = PersonaVector(torch.randn(4, 32) * 5, {"model_name": "tiny", "chosen_layer": 2})
    path = vec.save(tmp_path / "v.safetensors")
    argv = ["generate", "-m", str(model_dir), "-p", "Hi", "--max-new-tokens", "5", "--vector", str(path)]
    assert run([*argv, "--coef", "4"]) == 0
    assert capsys.readouterr().out != plain
    assert run([*argv, "--coef", "4", "--layer", "7"]) == 2
    one_line_error(capsys, 2, "out of range")


def test_generate_errors(tmp_path, model_dir, capsys) -> None:  # type: ignore[no-untyped-def]
    one_line_error(capsys, run(["generate", "-m", "no-such-alias", "-p", "Hi"]), "unknown model alias")
    wrong = PersonaVector(torch.randn(5, 16), {"model_name": "other"}).save(tmp_path / "w.safetensors")
    code = run(["generate", "-m", str(model_dir), "-p", "Hi", "--vector", str(wrong), "--layer", "1", "--coef", "1"])
    one_line_error(capsys, code, "does not fit")
    code = run(["generate", "-m", str(model_dir), "-p", "Hi", "--positions", "middle"])
    one_line_error(capsys, code, "unknown positions")


def test_console_script_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "personascope.cli", "capture", "-i", str(tmp_path / "none.jsonl"), "-o", "x"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: input file not found")


def _out(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = run(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.mark.parametrize("command", ["generate", "steer"])
def test_vector_without_coef_uses_the_chosen_one_or_fails(tmp_path, model_dir, capsys, command) -> None:  # type: ignore[no-untyped-def]
    directions = torch.randn(4, 32) * 5
    chosen = PersonaVector(directions, {"model_name": "tiny", "chosen_layer": 2, "chosen_coef": 4.0})
    path = chosen.save(tmp_path / "v.safetensors")
    base = [command, "-m", str(model_dir), "-p", "Hi", "--max-new-tokens", "6", "--temperature", "0"]
    plain = _out(["generate", *base[1:]], capsys)  # unsteered (`steer` always steers; its plain twin is generate)
    defaults = _out([*base, "--vector", str(path)], capsys)
    explicit = _out([*base, "--vector", str(path), "--layer", "2", "--coef", "4"], capsys)
    assert defaults == explicit != plain  # the chosen coefficient, never a silent 0
    zero = _out([*base, "--vector", str(path), "--coef", "0"], capsys)
    # an explicit 0 is allowed and steers nothing (`steer` prints "> prompt", the reply and a blank line)
    assert zero == (plain if command == "generate" else f"> Hi\n{plain}\n")
    bare = PersonaVector(directions, {"model_name": "tiny"}).save(tmp_path / "bare.safetensors")
    one_line_error(capsys, run([*base, "--vector", str(bare), "--layer", "2"]), "no chosen coefficient; pass --coef")
    one_line_error(capsys, run([*base, "--vector", str(bare), "--coef", "1"]), "no chosen layer; pass --layer")
    for bad in ("nan", "inf", "-inf"):
        one_line_error(capsys, run([*base, "--vector", str(path), "--coef", bad]), "finite")
    nan_vec = PersonaVector(directions.clone().fill_(float("nan")), dict(chosen.metadata))
    one_line_error(capsys, run([*base, "--vector", str(nan_vec.save(tmp_path / "n.safetensors"))]), "non-finite")
