from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import personascope as ps
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


def test_monitor_writes_rows_and_plot(tmp_path: Path, setup, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import personascope.report.plots as plots

    figures: list[Any] = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda plt, fig, path: figures.append(fig) or real_save(plt, fig, path))
    model_dir, vec = setup
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": CHAT}) + "\n")
    out, plot = tmp_path / "rows.jsonl", tmp_path / "turns.png"
    code = run(["monitor", "-m", str(model_dir), "-v", str(vec), "-i", str(src), "-o", str(out), "--plot", str(plot)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["turn"], r["kind"], r["text"]) for r in rows] == [
        (0, "prompt_last", "Hi there."),
        (0, "reply_mean", "Hello!"),
        (1, "prompt_last", "You are useless."),
        (1, "reply_mean", "I will crush you."),
    ]
    assert all(r["layer"] == 2 and r["conversation"] == 0 for r in rows)  # the vector's chosen layer
    # the projections, recomputed on the saved model: before each reply, and the reply's mean
    m = ps.load_model(str(model_dir))
    vector = PersonaVector.load(vec)
    before = ps.project(m, [CHAT[:1], CHAT[:3]], vector, layers=[2])[:, 0]
    replies = ps.project(m, [CHAT[:2], CHAT], vector, layers=[2], at="response_mean")[:, 0]
    got = torch.tensor([r["projection"] for r in rows])
    torch.testing.assert_close(got, torch.stack([before[0], replies[0], before[1], replies[1]]), atol=1e-4, rtol=1e-4)
    assert captured.out.splitlines()[0] == f"conv 0 turn 1 prompt_last layer 2: {rows[0]['projection']:+.3f}"
    # the plot: one line per kind, the turn (1-based) against the rows' projections
    assert plot.read_bytes()[:4] == b"\x89PNG"
    (fig,) = figures
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("turn", "projection on persona direction")
    assert ax.get_title() == "evil projection per turn"
    assert [line.get_label() for line in ax.lines] == ["conv 0 prompt_last (layer 2)", "conv 0 reply_mean (layer 2)"]
    for line, kind in zip(ax.lines, ("prompt_last", "reply_mean"), strict=True):
        want = [[r["turn"] + 1, r["projection"]] for r in rows if r["kind"] == kind]
        np.testing.assert_allclose(line.get_xydata(), want)


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
    argv = ["monitor", "-m", str(model_dir), "-v", str(wrong), "-i", str(src)]
    one_line_error(capsys, run([*argv, "--layer", "1"]), "does not fit")
    # no --layer and no chosen layer: refused before the model loads, nothing written
    one_line_error(capsys, run([*argv, "-o", str(tmp_path / "rows.csv")]), "no chosen layer; pass --layer")
    one_line_error(capsys, run([*argv, "--layer", "1", "--plot", str(tmp_path / "p.jpg")]), "--plot must end in .png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "w.safetensors"]
