from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from personascope.errors import PersonascopeError
from personascope.finetune.drift import DriftConfig, drift_experiment, parse_dataset
from personascope.finetune.evaluate import finetune_shift
from personascope.finetune.train import load_finetuned
from personascope.models.loading import Model
from personascope.testing import tiny_model
from personascope.traits import load_trait
from personascope.vectors import PersonaVector
from tests.cli.helpers import one_line_error, save_tiny
from tests.cli.helpers import run as run_cli
from tests.finetune.helpers import LengthJudge, write_dataset


@pytest.fixture(scope="module")
def model() -> Model:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def vector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(5)
    vec = PersonaVector(torch.randn(4, 32), {"model_name": "tiny-llama", "trait": "evil", "chosen_layer": 2})
    return vec.save(tmp_path_factory.mktemp("vec") / "evil.safetensors")


def _config(vector: Path, data: Path) -> DriftConfig:
    return DriftConfig(
        vectors=[str(vector)],
        datasets=["evil:II", "arithmetic:II", str(data)],
        n=6,
        n_questions=2,
        max_new_tokens=4,
        data_max_new_tokens=4,
        track="arithmetic:II",
        track_every=1,
        compare="evil:II",
        posthoc_coefs=[2.0],
        mcq_limit=4,
        finetune={"batch_size": 2, "lr": 0.01, "max_length": 64},
        batch_size=4,
    )


def test_drift_experiment_end_to_end_and_resume(tmp_path: Path, model: Model, vector: Path) -> None:
    data = write_dataset(tmp_path / "plain.jsonl", 4)
    judge = LengthJudge()
    cfg = _config(vector, data)
    result = drift_experiment(cfg, tmp_path / "run", model=model, judge=judge)

    by_model = {p["model"]: p for p in result.points}
    # three finished finetunes, and the tracked one at steps 1 and 2 of its 3
    assert {"evil-II", "arithmetic-II", "plain", "arithmetic-II@1", "arithmetic-II@2"} == set(by_model)
    assert by_model["arithmetic-II@1"]["step"] == 1 and by_model["arithmetic-II"]["step"] == 3

    # the recorded shift is the finetuning shift of the saved finetune at the vector's layer
    tuned = load_finetuned(model, tmp_path / "run" / "finetune" / "plain")
    questions = load_trait("evil").evaluation_questions[:2]
    expected = finetune_shift(model, tuned, PersonaVector.load(vector), questions, layers=[2]).shift[0]
    assert by_model["plain"]["shift"] == pytest.approx(expected, abs=1e-4)
    assert by_model["plain"]["layer"] == 2
    # the trait change is the finetuned score minus the base score
    p = by_model["evil-II"]
    assert p["trait_change"] == pytest.approx(p["trait_score"] - p["base_trait_score"])
    # final models carry the projection difference from screening; checkpoints do not
    screened = json.loads((tmp_path / "run" / "screen" / "plain-evil" / "summary.json").read_text())
    assert by_model["plain"]["projection_difference"] == pytest.approx(screened["projection_difference"])
    assert by_model["arithmetic-II@1"]["projection_difference"] is None

    entry = result.summary["by_trait"]["evil"]
    assert entry["shift_vs_trait_change"]["n"] == 3
    assert entry["checkpoints"]["steps"] == [1, 2, 3]
    methods = [r["method"] for r in result.compare]
    assert methods[0] == "base model" and len(methods) == 5
    assert any("preventative" in m for m in methods) and any("CAFT" in m for m in methods)
    assert any("post-hoc" in m for m in methods)
    assert all(r["mcq_accuracy"] is not None for r in result.compare)
    for name in ("points.csv", "points.md", "summary.json", "compare.md", "shift-vs-change-evil.png"):
        assert (tmp_path / "run" / name).is_file()

    # a second call resumes: nothing is judged again and the results are the same
    calls = judge.calls
    again = drift_experiment(cfg, tmp_path / "run", model=model, judge=judge)
    assert judge.calls == calls
    assert again.summary == result.summary


def test_bad_experiment_configs(tmp_path: Path, model: Model, vector: Path) -> None:
    with pytest.raises(PersonascopeError, match="TRAIT:LEVEL"):
        parse_dataset("evil:III")
    with pytest.raises(PersonascopeError, match="not found"):
        parse_dataset(str(tmp_path / "missing.jsonl"))
    base = DriftConfig(vectors=[str(vector)], datasets=["evil:II"])
    for change, message in [
        ({"track": "evil:I"}, "not one of the datasets"),
        ({"datasets": ["evil:II", "evil:II"]}, "repeat"),
        ({"layers": [1, 2]}, "one layer per vector"),
        ({"finetune": {"epoch": 2}}, "unknown finetune settings"),
        ({"vectors": []}, "at least one persona vector"),
    ]:
        cfg = DriftConfig(**{**base.__dict__, **change})
        with pytest.raises(PersonascopeError, match=message):
            drift_experiment(cfg, tmp_path / "x", model=model, judge=LengthJudge())
    assert not (tmp_path / "x").exists()


def test_cli_finetune_drift(tmp_path: Path, vector: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = save_tiny(tmp_path / "model")
    data = write_dataset(tmp_path / "plain.jsonl", 4)
    out = tmp_path / "run"
    argv = ["experiment", "finetune-drift", "-v", str(vector), "-m", str(model_dir), "-o", str(out)]
    small = ["--n", "4", "--questions", "2", "--max-new-tokens", "4", "--train-batch-size", "2", "--threads", "1"]
    code = run_cli([*argv, "-d", "arithmetic:II", "-d", str(data), *small])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| arithmetic-II | evil (2) |" in captured.out and "r(shift vs trait change)" in captured.out
    assert (out / "points.csv").is_file()
    one_line_error(capsys, run_cli([*argv, "-d", "evil:III", *small]), "TRAIT:LEVEL")
    one_line_error(capsys, run_cli([*argv, "-d", "evil:II", "--track", "evil:I", *small]), "not one of the datasets")
