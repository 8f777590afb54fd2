from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.cli.helpers import one_line_error, run, save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny"))


def test_prefs_elicit_fit_probe_personas_steer(tmp_path: Path, model_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    argv = ["prefs", "elicit", "-o", str(out), "-m", str(model_dir), "-p", "assistant,evil", "--n-tasks", "28"]
    argv += ["--budget", "30", "--batch-size", "32"]
    assert run(argv) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "assistant: " in text and "evil: " in text and "over 28 tasks" in text
    lines = (out / "pairs.jsonl").read_text()
    assert run(argv) == 0  # resumes: nothing new asked
    assert (out / "pairs.jsonl").read_text() == lines

    assert run(["prefs", "fit", str(out)]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    fit = json.loads((out / "fit.json").read_text())["personas"]
    pairs = [json.loads(x) for x in lines.splitlines()]
    for name in ("assistant", "evil"):
        assert fit[name]["n_pairs"] == sum(r["persona"] == name for r in pairs) <= 30
        assert len((out / f"utilities-{name}.csv").read_text().splitlines()) == 1 + 28
    assert run(["prefs", "probe", str(out), "--no-embed", "--alphas", "1,100"]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    probe = json.loads((out / "probe-assistant.json").read_text())
    assert f"assistant: best layer {probe['best_layer']} (by val r)" in text and "topic baseline" in text
    assert probe["alphas"] == [1.0, 100.0] and set(probe["baselines"]) == {"topic"}  # --no-embed: no embedding
    assert run(["prefs", "personas", str(out), "--alphas", "1,100"]) == 0
    assert "assistant (layer" in capsys.readouterr().out
    matrix = json.loads((out / "persona-matrix.json").read_text())
    assert matrix["personas"] == ["assistant", "evil"]
    np.testing.assert_allclose(np.diag(np.array(matrix["utility_r"], dtype=float)), 1.0)
    code = run(["prefs", "steer", str(out), "--layers", "2", "--coefs", "-1,1", "--pairs", "2", "--no-single"])
    assert code == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "| probe | differential | 2 |" in text and "| random | differential | 2 |" in text and "single" not in text
    summary = json.loads((out / "steer.json").read_text())
    # each swing is the curve's mean P at coefficient 1 minus at -1, over the 2 pairs in steer.jsonl
    records = [json.loads(x) for x in (out / "steer.jsonl").read_text().splitlines()]
    for sw, direction in zip(summary["swings"], ("probe", "random"), strict=True):
        assert (sw["direction"], sw["mode"], sw["layer"]) == (direction, "differential", 2)
        p = {c: [r["p"] for r in records if r["direction"] == direction and r["coef"] == c] for c in (-1.0, 1.0)}
        assert len(p[1.0]) == len(p[-1.0]) == 2
        assert sw["swing"] == pytest.approx(np.mean(p[1.0]) - np.mean(p[-1.0]))
    assert summary["coefs"] == [-1.0, 1.0] and len(summary["pairs"]) == 2
    for name in ("probe-assistant.png", "persona-matrix.png", "steer.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert (out / "fit.md").read_text().count("\n") == 2 + 2  # header, rule, one row per persona


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prefs_bad_input_is_one_line(tmp_path: Path, model_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    m = ["-m", str(model_dir)]
    dup = _write(
        tmp_path / "dup.jsonl", [{"id": "t", "text": "a", "topic": "x"}, {"id": "t", "text": "b", "topic": "y"}]
    )
    one_line_error(capsys, run(["prefs", "elicit", "-o", str(tmp_path / "a"), *m, "--tasks", str(dup)]), "duplicate")
    code = run(["prefs", "elicit", "-o", str(tmp_path / "b"), *m, "--topic", "gardening"])
    one_line_error(capsys, code, "unknown topic 'gardening'")
    split = _write(tmp_path / "split.jsonl", [{"id": "t", "text": "a", "topic": "x", "split": "holdout"}])
    one_line_error(capsys, run(["prefs", "elicit", "-o", str(tmp_path / "c"), *m, "--tasks", str(split)]), "split")
    personas = tmp_path / "personas.json"
    personas.write_text(json.dumps([{"name": "blank"}]))
    code = run(["prefs", "elicit", "-o", str(tmp_path / "d"), *m, "-p", "blank", "--personas-file", str(personas)])
    one_line_error(capsys, code, "system_prompt")
    one_line_error(capsys, run(["prefs", "fit", str(tmp_path / "nowhere")]), "not a run directory")

    out = tmp_path / "run"
    argv = ["prefs", "elicit", "-o", str(out), *m, "--n-tasks", "12", "--budget", "12", "--batch-size", "32"]
    assert run(argv) == 0
    capsys.readouterr()
    ids = [json.loads(line)["id"] for line in (out / "tasks.jsonl").read_text().splitlines()]
    pairs = _write(tmp_path / "pairs.jsonl", [{"persona": "assistant", "a": ids[0], "b": "ghost", "p": 0.5}])
    one_line_error(capsys, run(["prefs", "fit", str(out), "--pairs", str(pairs)]), "'ghost' is not one of the run's")
    one_line_error(capsys, run(["prefs", "probe", str(out), "--no-embed"]), "prefs fit")
    one_line_error(capsys, run([*argv[:-2], "--batch-size", "8"]), "different config")
    assert run(["prefs", "fit", str(out)]) == 0
    one_line_error(capsys, run(["prefs", "steer", str(out)]), "prefs probe")
    one_line_error(capsys, run(["prefs", "steer", str(out), "--coefs", "1,x"]), "--coefs")
    one_line_error(capsys, run(["prefs", "personas", str(out)]), "at least two")
