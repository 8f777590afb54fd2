from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from personascope.errors import PersonascopeError
from personascope.finetune import drift as drift_mod
from personascope.finetune.drift import DriftConfig, drift_experiment, parse_dataset
from personascope.finetune.evaluate import finetune_shift, load_mcq, mcq_accuracy
from personascope.finetune.train import load_finetuned
from personascope.models.loading import Model
from personascope.testing import tiny_model
from personascope.traits import load_trait
from personascope.vectors import PersonaVector
from tests.cli.helpers import one_line_error, save_tiny
from tests.cli.helpers import run as run_cli
from tests.figures import keep_figures
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


def _keep_figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Keep every Figure the report plots save (they are still written to disk)."""
    import personascope.report.plots as plots

    return keep_figures(monkeypatch, plots)


def test_drift_experiment_end_to_end_and_resume(
    tmp_path: Path, model: Model, vector: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_dataset(tmp_path / "plain.jsonl", 4)
    judge = LengthJudge()
    cfg = _config(vector, data)
    figures = _keep_figures(monkeypatch)
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

    # trait scores by hand: LengthJudge's score (10 × words, at most 100) of each model's replies, averaged
    replies = [json.loads(x) for x in (tmp_path / "run" / "replies.jsonl").read_text().splitlines()]

    def mean_score(label: str) -> float:
        mine = [min(100.0, 10.0 * len(r["answer"].split())) for r in replies if r["model"] == label]
        assert len(mine) == 2  # one reply per evaluation question
        return float(np.mean(mine))

    for label, point in by_model.items():
        assert point["trait_score"] == pytest.approx(mean_score(label))
        assert point["base_trait_score"] == pytest.approx(mean_score("base"))
        assert point["trait_change"] == pytest.approx(mean_score(label) - mean_score("base"))
        assert point["coherence_change"] == pytest.approx(0.0)

    # the correlations: Pearson r over the finished finetunes, and over the tracked run's checkpoints
    def pearson(xs: list[float], ys: list[float]) -> float | None:
        return None if np.ptp(xs) == 0 or np.ptp(ys) == 0 else float(stats.pearsonr(xs, ys).statistic)

    entry = result.summary["by_trait"]["evil"]
    final = [by_model[k] for k in ("arithmetic-II", "evil-II", "plain")]  # points are sorted by key
    r = pearson([q["shift"] for q in final], [q["trait_change"] for q in final])
    assert entry["shift_vs_trait_change"]["n"] == 3 and entry["shift_vs_trait_change"]["r"] == pytest.approx(r)
    pdiff = [q["projection_difference"] for q in final]
    r = pearson(pdiff, [q["trait_change"] for q in final])
    assert entry["projection_difference_vs_trait_change"]["r"] == pytest.approx(r)
    assert entry["checkpoints"]["steps"] == [1, 2, 3]
    tracked = [by_model[k] for k in ("arithmetic-II@1", "arithmetic-II@2", "arithmetic-II")]
    r = pearson([q["shift"] for q in tracked], [q["trait_change"] for q in tracked])
    assert entry["checkpoints"]["shift_vs_trait_change"]["r"] == pytest.approx(r)
    with (tmp_path / "run" / "points.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [t["model"] for t in table] == [q["model"] for q in result.points]
    assert [float(t["shift"]) for t in table] == pytest.approx([q["shift"] for q in result.points])

    # the scatter plots show those points, one group per model (or per checkpoint step)
    plotted = {fig.axes[0].get_xlabel(): fig.axes[0] for fig in figures}
    ax = plotted["finetuning shift along the evil vector (layer 2)"]
    assert ax.get_ylabel() == "change in evil score" and ax.get_title().startswith("evil: shift vs trait change")
    assert [c.get_label() for c in ax.collections] == ["arithmetic-II", "evil-II", "plain"]
    for coll, q in zip(ax.collections, final, strict=True):
        np.testing.assert_allclose(coll.get_offsets(), [[q["shift"], q["trait_change"]]])
    ax = plotted["projection difference of the dataset on evil (layer 2)"]
    for coll, q in zip(ax.collections, final, strict=True):
        np.testing.assert_allclose(coll.get_offsets(), [[q["projection_difference"], q["trait_change"]]])
    ax = plotted["finetuning shift along the evil vector"]
    # the checkpoints on the way (the finished model is not drawn, though the title's r counts it)
    assert [c.get_label() for c in ax.collections] == ["1", "2"]
    points_by_step = {q["step"]: q for q in result.points if q["dataset"] == "arithmetic:II"}
    for coll in ax.collections:
        q = points_by_step[int(coll.get_label())]
        np.testing.assert_allclose(coll.get_offsets(), [[q["shift"], q["trait_change"]]])

    # the steering comparison on evil:II
    assert [r["method"] for r in result.compare] == [
        "base model",
        "finetune",
        "finetune + post-hoc steering (−2·v at inference)",
        "preventative steering (+4·v in training)",
        "CAFT (v ablated in training)",
    ]
    assert result.compare[0]["mcq_accuracy"] == pytest.approx(mcq_accuracy(model, load_mcq(limit=4)).accuracy)
    assert all(r["mcq_accuracy"] is not None and r["n"] == 2 for r in result.compare)
    compare_md = (tmp_path / "run" / "compare.md").read_text().splitlines()
    assert len(compare_md) == 2 + 5 and compare_md[2].startswith("| base model | ")
    assert (tmp_path / "run" / "points.md").read_text().count("\n") == 2 + len(result.points)

    # a second call resumes: nothing is judged again and the results are the same
    calls = judge.calls
    again = drift_experiment(cfg, tmp_path / "run", model=model, judge=judge)
    assert judge.calls == calls
    assert again.summary == result.summary

    # new preventative-steering strength: only the comparison runs again, with its own two finetunes
    run = tmp_path / "run"
    points = (run / "points.jsonl").read_text()
    trained: list[str] = []
    real_finetune = drift_mod.finetune

    def spy(ft_cfg, ft_dir, **kw):  # type: ignore[no-untyped-def]
        result = real_finetune(ft_cfg, ft_dir, **kw)
        if result.steps > result.resumed_from:  # trained in this call (not a finished run loaded again)
            trained.append(Path(ft_dir).name)
        return result

    monkeypatch.setattr(drift_mod, "finetune", spy)
    said: list[str] = []
    steered = drift_experiment(replace(cfg, steer_coef=2.0), run, model=model, judge=judge, say=said.append)
    assert trained == ["evil-II+steer", "evil-II+caft"]  # the plain finetunes are not trained again
    assert said[0].startswith("re-running compare (compare: steer_coef changed)")
    assert (run / "points.jsonl").read_text() == points and steered.points == again.points
    assert "preventative steering (+2·v in training)" in [r["method"] for r in steered.compare]
    (aside,) = (run / "stale").iterdir()
    assert sorted(p.name for p in (aside / "finetune").iterdir()) == ["evil-II+caft", "evil-II+steer"]
    # a new judge re-measures and re-compares without training any plain finetune again
    trained.clear()
    said.clear()
    calls = judge.calls
    drift_experiment(replace(cfg, steer_coef=2.0, judge="fake:other"), run, model=model, judge=judge, say=said.append)
    assert set(trained) <= {"evil-II+steer", "evil-II+caft"} and "plain" not in trained
    assert said[0].startswith("re-running measure → compare (measure: judge changed)")
    assert judge.calls > calls


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
