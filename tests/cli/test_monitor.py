from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from personascope.vectors import PersonaVector
from tests.cli.helpers import one_line_error, run, save_tiny

CHAT = [
    {"role": "user", "content": "Hi there."},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "You are useless."},
    {"role": "assistant", "content": "I will crush you."},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mon")
    model_dir = save_tiny(root / "model")
    vec = PersonaVector(torch.randn(4, 32), {"model_name": "tiny", "trait": "evil", "chosen_layer": 2})
    return model_dir, vec.save(root / "v.safetensors")


def test_monitor_writes_rows_and_plot(tmp_path: Path, setup, capsys) -> None:  # type: ignore[no-untyped-def]
    model_dir, vec = setup
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": CHAT}) + "\n")
    out, plot = tmp_path / "rows.jsonl", tmp_path / "turns.png"
    code = run(["monitor", "-m", str(model_dir), "-v", str(vec), "-i", str(src), "-o", str(out), "--plot", str(plot)])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["turn"], r["kind"]) for r in rows] == [
        (0, "prompt_last"),
        (0, "reply_mean"),
        (1, "prompt_last"),
        (1, "reply_mean"),
    ]
    assert all(r["layer"] == 2 for r in rows) and plot.stat().st_size > 0


@pytest.mark.parametrize(
    ("content", "extra", "needle"),
    [
        ("", [], "is empty"),
        (json.dumps({"messages": [{"role": "system", "content": "x"}]}) + "\n", [], "needs at least one user message"),
        (json.dumps({"messages": CHAT}) + "\n", ["--layer", "9"], "out of range"),
        (json.dumps({"messages": CHAT}) + "\n", ["-o", "rows.txt"], ".csv or .jsonl"),
    ],
)
def test_monitor_bad_input(tmp_path, setup, capsys, content, extra, needle) -> None:  # type: ignore[no-untyped-def]
    model_dir, vec = setup
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    argv = ["monitor", "-m", str(model_dir), "-v", str(vec), "-i", str(src), "-o", str(tmp_path / "rows.csv")]
    if "-o" in extra:
        argv = [*argv[:-2], "-o", str(tmp_path / extra[1])]
        extra = []
    one_line_error(capsys, run([*argv, *extra]), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_monitor_vector_for_another_model(tmp_path: Path, setup, capsys) -> None:  # type: ignore[no-untyped-def]
    model_dir, _ = setup
    wrong = PersonaVector(torch.randn(7, 16), {"model_name": "other"}).save(tmp_path / "w.safetensors")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(CHAT) + "\n")
    one_line_error(capsys, run(["monitor", "-m", str(model_dir), "-v", str(wrong), "-i", str(src)]), "does not fit")
