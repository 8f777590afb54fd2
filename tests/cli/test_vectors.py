from __future__ import annotations

import json
from pathlib import Path

import pytest

from personascope.vectors import PersonaVector
from tests.cli.helpers import one_line_error, run, save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny"))


SMALL = ["--questions", "2", "--pairs", "1", "--samples-per-question", "1", "--max-new-tokens", "4"]


def test_extract_sweep_steer(tmp_path: Path, model_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "extract"
    code = run(["extract", "evil", "-m", str(model_dir), "--judge", "none", "-o", str(out), *SMALL])
    assert code == 0, capsys.readouterr().err
    vec_path = out / "vectors" / "evil_response_mean.safetensors"
    assert PersonaVector.load(vec_path).metadata["n_pos"] == 2
    judge = f"contrast:{model_dir}"
    code = run(
        [
            "sweep",
            str(vec_path),
            "-m",
            str(model_dir),
            "--judge",
            judge,
            "--layers",
            "1,2",
            "--coefs",
            "-1,1,2",
            "--questions",
            "2",
            "--max-new-tokens",
            "4",
            "--coherence-threshold",
            "0",
            "-o",
            str(tmp_path / "sw"),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0 and "| vector | 2 | 2 |" in text and "recommended: layer" in text
    summary = json.loads((tmp_path / "sw" / "summary.json").read_text())
    cells = summary["cells"]
    assert {(c["direction"], c["layer"], c["coef"]) for c in cells} == {("base", None, 0.0)} | {
        (d, layer, c) for d in ("vector", "random") for layer in (1, 2) for c in (-1.0, 1.0, 2.0)
    }
    # with --coherence-threshold 0 the recommendation is the positive vector cell with the largest trait score
    base = next(c["trait"] for c in cells if c["direction"] == "base")
    best = max(
        (c for c in cells if c["direction"] == "vector" and c["coef"] > 0),
        key=lambda c: (c["trait"] - base, -c["coef"]),
    )
    assert (summary["recommended"]["layer"], summary["recommended"]["coef"]) == (best["layer"], best["coef"])
    assert f"recommended: layer {best['layer']}" in text
    swept = PersonaVector.load(vec_path)
    assert (swept.chosen_layer, swept.metadata["chosen_coef"]) == (best["layer"], best["coef"])
    code = run(["steer", "-v", str(vec_path), "-m", str(model_dir), "-p", "Hello there", "--max-new-tokens", "4"])
    assert code == 0 and capsys.readouterr().out.startswith("> Hello there")


def test_extract_resumes(tmp_path: Path, model_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    argv = ["extract", "evil", "-m", str(model_dir), "--judge", "none", "-o", str(tmp_path / "x"), *SMALL]
    assert run(argv) == 0
    first = (tmp_path / "x" / "rollouts.jsonl").read_text()
    assert run(argv) == 0
    assert (tmp_path / "x" / "rollouts.jsonl").read_text() == first
    capsys.readouterr()
    # a setting the rollouts depend on redoes them (and what follows); the old ones are kept aside
    assert run([*argv[:-2], "--max-new-tokens", "5"]) == 0
    err = capsys.readouterr().err
    assert "re-running rollouts → scores → filter → vectors (rollouts: max_new_tokens changed)" in err
    (aside,) = (tmp_path / "x" / "stale").iterdir()
    assert (aside / "rollouts.jsonl").read_text() == first


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["extract", "no-such-trait", "--judge", "none"], "no-such-trait"),
        (["extract", "evil", "--profile", "huge", "--judge", "none"], "unknown profile"),
        (["extract", "evil", "--judge", "bogus:x"], "judge"),
    ],
)
def test_extract_bad_input(tmp_path, model_dir, capsys, argv, needle) -> None:  # type: ignore[no-untyped-def]
    code = run([*argv, "-m", str(model_dir), "-o", str(tmp_path / "run")])
    one_line_error(capsys, code, needle)


def test_sweep_and_steer_bad_input(tmp_path, model_dir, capsys) -> None:  # type: ignore[no-untyped-def]
    import torch

    vec = PersonaVector(torch.randn(4, 32), {"model_name": "tiny", "trait": "evil"}).save(tmp_path / "v.safetensors")
    one_line_error(capsys, run(["sweep", str(vec), "-m", str(model_dir), "--coefs", "a,b"]), "comma-separated numbers")
    one_line_error(capsys, run(["steer", "-v", str(vec), "-m", str(model_dir), "-p", "hi"]), "no chosen layer")
    wrong = PersonaVector(torch.randn(9, 16), {"model_name": "x", "trait": "evil"}).save(tmp_path / "w.safetensors")
    code = run(["steer", "-v", str(wrong), "-m", str(model_dir), "-p", "hi", "--layer", "1", "--coef", "1"])
    one_line_error(capsys, code, "does not fit")


def test_extract_from_step_on_the_command_line(tmp_path: Path, model_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "extract"
    argv = ["extract", "evil", "-m", str(model_dir), "--judge", "none", "-o", str(out), *SMALL]
    assert run(argv) == 0, capsys.readouterr().err
    rollouts = (out / "rollouts.jsonl").read_text()
    capsys.readouterr()
    assert run([*argv, "--from", "filter"]) == 0
    err = capsys.readouterr().err
    assert f"re-running filter → vectors (asked with --from filter); old outputs kept under {out / 'stale'}" in err
    assert (out / "rollouts.jsonl").read_text() == rollouts
    code = run([*argv, "--from", "judging"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: unknown step 'judging' for --from; use one of rollouts, scores, filter, vectors"
