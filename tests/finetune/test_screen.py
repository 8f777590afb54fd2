from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import personascope.finetune.screen as screen_mod
from personascope.errors import PersonascopeError
from personascope.finetune.datasets import load_chat_jsonl, split_prompt
from personascope.finetune.screen import ScreenConfig, projection_differences, screen_dataset
from personascope.finetune.train import load_finetuned
from personascope.generation import generate
from personascope.models.loading import Model, load_model
from personascope.residual.capture import capture
from personascope.testing import tiny_model
from personascope.traits import load_trait
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


def _keep_figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Keep every matplotlib Figure that is saved (it is still written)."""
    from matplotlib.figure import Figure

    figures: list[Any] = []
    real = Figure.savefig

    def keep(self: Any, *args: Any, **kwargs: Any) -> Any:
        figures.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


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
    figures = _keep_figures(monkeypatch)
    result = screen_dataset(cfg, tmp_path / "run", model=model)
    base_answers = [json.loads(x) for x in (tmp_path / "run" / "base_answers.jsonl").read_text().splitlines()]
    assert [b["key"] for b in base_answers] == [str(i) for i in range(7)]
    # the base answers are the model's own (seeded) replies to each prompt
    examples = load_chat_jsonl(data)
    prompts = [split_prompt(e.messages)[0] for e in examples]
    regenerated = generate(model, prompts, max_new_tokens=5, temperature=1.0, seeds=list(range(7)), progress=False)
    assert [b["answer"] for b in base_answers] == [g.text for g in regenerated]
    # each difference, recomputed from raw activations: dataset answer minus base answer, on the unit direction
    unit = PersonaVector.load(vector).unit(2)
    expected: dict[int, float | None] = {}
    for i, (e, b) in enumerate(zip(examples, base_answers, strict=True)):
        if not b["answer"].strip():
            expected[i] = None
            continue
        convs = [[*prompts[i], {"role": "assistant", "content": a}] for a in (split_prompt(e.messages)[1], b["answer"])]
        proj = capture(model, convs, reductions=["response_mean"], layers=[2])["response_mean"][:, 0] @ unit
        expected[i] = float(proj[0] - proj[1])
    valid = {i: d for i, d in expected.items() if d is not None}
    assert len(valid) >= 3  # enough real comparisons for the checks below to mean something
    for r in result.ranked:
        if expected[r["index"]] is None:
            assert r["difference"] is None and not r["flagged"]
        else:
            assert r["difference"] == pytest.approx(expected[r["index"]], abs=1e-4)
            assert r["flagged"] == (expected[r["index"]] > 0)
    order = sorted(valid, key=lambda i: -valid[i]) + [i for i in expected if expected[i] is None]
    assert [r["index"] for r in result.ranked] == order and [r["rank"] for r in result.ranked] == list(range(1, 8))
    assert result.n_missing == 7 - len(valid)
    assert result.projection_difference == pytest.approx(np.mean(list(valid.values())), abs=1e-4)
    assert result.n_flagged == sum(d > 0 for d in valid.values())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n"] == 7 and summary["n_flagged"] == result.n_flagged and summary["layer"] == 2
    assert summary["projection_difference"] == pytest.approx(result.projection_difference)
    with (tmp_path / "run" / "ranked.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [int(t["index"]) for t in table] == order
    assert [t["flagged"] == "True" for t in table] == [r["flagged"] for r in result.ranked]
    jsonl = [json.loads(x) for x in (tmp_path / "run" / "ranked.jsonl").read_text().splitlines()]
    assert [j["difference"] for j in jsonl] == [r["difference"] for r in result.ranked]
    # the histogram holds every valid difference, with the threshold and the mean as vertical lines
    (fig,) = figures
    (ax,) = fig.axes
    assert ax.get_xlabel() == "projection difference on evil (layer 2)" and ax.get_ylabel() == "samples"
    counts, _ = np.histogram(list(valid.values()), bins=5)
    assert [p.get_height() for p in ax.patches] == counts.tolist()
    vlines = [line.get_xdata()[0] for line in ax.lines]
    assert vlines == pytest.approx([0.0, np.mean(list(valid.values()))], abs=1e-4)
    # the rows keep line numbers
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
    # the judge scores the dataset's answers: 10 × their word count (see LengthJudge)
    answers = [r["messages"][1]["content"] for r in chat_rows(8)]  # type: ignore[index]
    scores = [min(100.0, 10.0 * len(a.split())) for a in answers]
    assert {r["index"]: r["judge_score"] for r in result.ranked} == dict(enumerate(scores))
    assert {r["index"]: r["judge_flagged"] for r in result.ranked} == {i: sc >= 40 for i, sc in enumerate(scores)}
    by_judge = {str(i) for i, sc in enumerate(scores) if sc >= 40}
    assert by_judge == {"0", "2", "3", "4", "6", "7"}  # all but the 3-word "Cats and dogs!"
    diffs = {r["key"]: r["difference"] for r in result.ranked}
    by_proj = {k for k, d in diffs.items() if d is not None and d > 0}
    assert j["flagged_by_judge"] == 6 and j["flagged_by_projection"] == len(by_proj)
    assert j["flagged_by_both"] == len(by_judge & by_proj) and j["scored"] == 8
    assert j["jaccard"] == pytest.approx(len(by_judge & by_proj) / len(by_judge | by_proj))
    pairs = [(d, scores[int(k)]) for k, d in diffs.items() if d is not None]
    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    assert j["spearman"] == pytest.approx(rho, nan_ok=True) and j["spec"] == "fake:length"


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
    assert "<- vector's layer" in captured.out
    # the shift, recomputed from plain forward passes: the mean last-prompt-token hidden state, tuned minus base,
    # on the unit vector, over all the trait's evaluation questions
    base = load_model(str(model_dir))
    tuned = load_finetuned(base, out)
    vec = PersonaVector.load(vector)
    convs = [[{"role": "user", "content": q}] for q in load_trait("evil").evaluation_questions]
    with (tmp_path / "shift.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["layer"]) for r in rows] == [1, 2]
    for row in rows:
        layer = int(row["layer"])
        means = []
        for m in (base, tuned):
            with torch.no_grad():
                states = [
                    m.hf_model(
                        input_ids=torch.tensor([m.formatter.prompt_ids(c)]), output_hidden_states=True
                    ).hidden_states[layer][0, -1]
                    for c in convs
                ]
            means.append(torch.stack(states).mean(0))
        assert float(row["shift"]) == pytest.approx(float((means[1] - means[0]) @ vec.unit(layer)), abs=1e-4)
    assert f"{len(convs)} questions" in captured.out
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
    with (tmp_path / "scr" / "ranked.csv").open() as fh:
        ranked = list(csv.DictReader(fh))
    assert sorted(int(r["index"]) for r in ranked) == list(range(8))
    diffs = [float(r["difference"]) for r in ranked if r["difference"]]
    assert diffs == sorted(diffs, reverse=True)
    summary = json.loads((tmp_path / "scr" / "summary.json").read_text())
    assert summary["projection_difference"] == pytest.approx(np.mean(diffs), abs=1e-4)


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
