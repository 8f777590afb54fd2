from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import personascope.finetune.screen as screen_mod
from personascope.errors import PersonascopeError
from personascope.finetune.datasets import load_chat_jsonl, split_prompt
from personascope.finetune.screen import ScreenConfig, projection_differences, screen_dataset
from personascope.models.loading import Model
from personascope.residual.capture import capture
from personascope.testing import tiny_model
from personascope.vectors import PersonaVector
from tests.cli.helpers import one_line_error, save_tiny
from tests.cli.helpers import run as run_cli
from tests.finetune.helpers import LengthJudge, chat_rows, write_dataset


@pytest.fixture(scope="module")
def model() -> Model:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def vector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(7)
    vec = PersonaVector(torch.randn(4, 32), {"model_name": "tiny-llama", "trait": "evil", "chosen_layer": 2})
    return vec.save(tmp_path_factory.mktemp("vec") / "evil.safetensors")


def test_projection_difference_matches_a_direct_capture(model: Model, vector: Path) -> None:
    vec = PersonaVector.load(vector)
    prompts = [[{"role": "user", "content": "Tell me a joke."}], [{"role": "user", "content": "Hi"}]]
    answers, reference = ["Cats and dogs!", "Paris is nice."], ["The quick fox.", "Numbers: 1 2 3"]
    diffs, projections = projection_differences(model, prompts, answers, reference, vec, 2)
    for i in range(2):
        convs = [[*prompts[i], {"role": "assistant", "content": a}] for a in (answers[i], reference[i])]
        acts = capture(model, convs, reductions=["response_mean"], layers=[2])["response_mean"][:, 0]
        proj = acts @ vec.unit(2)
        assert float(diffs[i]) == pytest.approx(float(proj[0] - proj[1]), abs=1e-5)
        assert float(projections[i]) == pytest.approx(float(proj[0]), abs=1e-5)


def test_a_dataset_screened_against_itself_scores_zero(tmp_path: Path, model: Model, vector: Path) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 6)
    cfg = ScreenConfig(dataset=str(data), vector=str(vector), model="tiny", reference=str(data), chunk=4)
    result = screen_dataset(cfg, tmp_path / "run", model=model)
    assert result.n == 6 and result.projection_difference == 0.0
    assert all(r["difference"] == 0.0 for r in result.ranked) and result.n_flagged == 0


def test_screen_generates_base_answers_ranks_flags_and_resumes(
    tmp_path: Path, model: Model, vector: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 7)
    cfg = ScreenConfig(
        dataset=str(data), vector=str(vector), model="tiny", max_new_tokens=5, chunk=3, batch_size=2, threshold=0.0
    )
    result = screen_dataset(cfg, tmp_path / "run", model=model)
    base_answers = [json.loads(x) for x in (tmp_path / "run" / "base_answers.jsonl").read_text().splitlines()]
    assert len(base_answers) == 7
    diffs = [r["difference"] for r in result.ranked if r["difference"] is not None]
    assert diffs == sorted(diffs, reverse=True) and result.n_missing == 7 - len(diffs)
    assert result.projection_difference == pytest.approx(sum(diffs) / len(diffs))
    assert result.n_flagged == sum(d > 0 for d in diffs)
    assert all(r["flagged"] == (r["difference"] is not None and r["difference"] > 0) for r in result.ranked)
    assert [r["rank"] for r in result.ranked] == list(range(1, 8))
    for name in ("ranked.csv", "ranked.jsonl", "histogram.png", "summary.json"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n"] == 7 and summary["n_flagged"] == result.n_flagged
    # the base answers are what the model says to the dataset's prompts, and the rows keep line numbers
    examples = load_chat_jsonl(data)
    by_index = {r["index"]: r for r in result.ranked}
    assert [by_index[i]["line"] for i in range(7)] == [e.line for e in examples]
    assert [by_index[i]["answer"] for i in range(7)] == [split_prompt(e.messages)[1] for e in examples]

    # resuming generates and captures nothing again
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed")

    monkeypatch.setattr(screen_mod, "projection_differences", boom)
    monkeypatch.setattr("personascope.pipelines.common.generate", boom)
    again = screen_dataset(cfg, tmp_path / "run", model=model)
    assert [r["difference"] for r in again.ranked] == [r["difference"] for r in result.ranked]


def test_screen_streams_in_chunks_after_an_interruption(
    tmp_path: Path, model: Model, vector: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 6)
    cfg = ScreenConfig(dataset=str(data), vector=str(vector), model="tiny", reference=str(data), chunk=2)
    real = screen_mod.projection_differences
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(screen_mod, "projection_differences", flaky)
    with pytest.raises(KeyboardInterrupt):
        screen_dataset(cfg, tmp_path / "run", model=model)
    assert len((tmp_path / "run" / "samples.jsonl").read_text().splitlines()) == 2
    result = screen_dataset(cfg, tmp_path / "run", model=model)
    assert result.n == 6 and calls["n"] == 4  # the first chunk was not redone


def test_judge_comparison_counts_flags_and_overlap(tmp_path: Path, model: Model, vector: Path) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 8)
    cfg = ScreenConfig(
        dataset=str(data),
        vector=str(vector),
        model="tiny",
        max_new_tokens=4,
        threshold=0.0,
        judge="fake",
        judge_threshold=40.0,
    )
    result = screen_dataset(cfg, tmp_path / "run", model=model, judge=LengthJudge())
    j = result.judge
    assert j is not None
    by_judge = {r["key"] for r in result.ranked if r["judge_score"] is not None and r["judge_score"] >= 40}
    by_proj = {r["key"] for r in result.ranked if r["flagged"]}
    assert j["flagged_by_judge"] == len(by_judge) and j["flagged_by_projection"] == len(by_proj)
    assert j["flagged_by_both"] == len(by_judge & by_proj) and j["scored"] == 8


def test_reference_with_other_prompts_is_an_error(tmp_path: Path, model: Model, vector: Path) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 3)
    other = tmp_path / "o.jsonl"
    rows = chat_rows(3)
    rows[1]["messages"][0]["content"] = "Something else?"  # type: ignore[index]
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PersonascopeError, match="another prompt"):
        screen_dataset(
            ScreenConfig(dataset=str(data), vector=str(vector), reference=str(other)), tmp_path / "r", model=model
        )


# ------------------------------------------------------------------------------------------------ CLI end to end


def run(argv: list[str]) -> int:
    """The CLI in-process, keeping torch's thread count (``--threads 0`` would adapt it to the machine's load)."""
    if argv[0] in ("finetune", "finetune-shift", "screen", "evaluate") or argv[:2] == ["data", "build"]:
        argv = [*argv, "--threads", str(torch.get_num_threads())]
    return run_cli(argv)


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory: pytest.TempPathFactory, vector: Path) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    return save_tiny(root / "model"), vector, write_dataset(root / "data.jsonl", 8)


def test_cli_finetune_shift_and_screen_on_a_tiny_model(tmp_path: Path, cli_setup, capsys) -> None:  # type: ignore[no-untyped-def]
    model_dir, vector, data = cli_setup
    out = tmp_path / "ft"
    code = run(["finetune", str(data), "-m", str(model_dir), "-o", str(out), "--batch-size", "4", "--lr", "0.01"])
    assert code == 0, capsys.readouterr().err
    assert "trained 2 steps" in capsys.readouterr().out
    code = run(["finetune-shift", str(out), "-v", str(vector), "--layers", "1,2", "-o", str(tmp_path / "shift.csv")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "<- vector's layer" in captured.out and (tmp_path / "shift.csv").is_file()
    code = run(
        [
            "screen",
            str(data),
            "-v",
            str(vector),
            "-m",
            str(model_dir),
            "-o",
            str(tmp_path / "scr"),
            "--max-new-tokens",
            "4",
            "--top",
            "3",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "projection difference" in captured.out and captured.out.count("#") >= 1
    assert (tmp_path / "scr" / "ranked.csv").is_file()


def test_cli_one_line_errors(tmp_path: Path, cli_setup, capsys) -> None:  # type: ignore[no-untyped-def]
    model_dir, vector, data = cli_setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        data.read_text().splitlines()[0]
        + "\n{oops\n"
        + json.dumps({"messages": [{"role": "user", "content": "x"}]})
        + "\n"
    )
    one_line_error(capsys, run(["finetune", str(bad), "-m", str(model_dir), "-o", str(tmp_path / "a")]), "line 2")
    one_line_error(capsys, run(["screen", str(bad), "-v", str(vector), "-m", str(model_dir)]), "line 3")
    wrong = PersonaVector(torch.randn(7, 16), {"model_name": "other"}).save(tmp_path / "w.safetensors")
    one_line_error(capsys, run(["screen", str(data), "-v", str(wrong), "-m", str(model_dir)]), "does not fit")
    # an adapter trained on another base model
    out = tmp_path / "ft"
    assert run(["finetune", str(data), "-m", str(model_dir), "-o", str(out), "--limit", "4"]) == 0
    capsys.readouterr()
    other = tmp_path / "other"
    m = tiny_model("llama", seed=1)
    m.hf_model.save_pretrained(other)
    m.tokenizer.save_pretrained(other)
    one_line_error(capsys, run(["finetune-shift", str(out), "-v", str(vector), "-m", str(other)]), "fingerprint")
    one_line_error(capsys, run(["data", "build", "evil", "--level", "III", "-o", str(tmp_path / "d")]), "unknown level")
