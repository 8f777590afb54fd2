from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

import personascope as ps
from personascope.errors import PersonascopeError
from personascope.judges import JudgeItem, JudgeResult
from personascope.pipelines import extract as extract_mod
from personascope.pipelines.extract import ExtractConfig, extract, keep
from personascope.testing import tiny_model
from personascope.traits import TraitSpec


class PolarityJudge:
    """Scores items alternately high and low. Rollouts alternate pos/neg, so pos answers get ``trait_score`` and neg
    answers ``100 - trait_score``: the filter's behaviour is predictable. Counts calls."""

    id = "fake:polarity"

    def __init__(self, trait_score: float = 80.0, coherence: float = 90.0) -> None:
        self.trait_score, self.coherence = trait_score, coherence
        self.calls = 0

    def cache_scope(self, trait: TraitSpec | None) -> str:
        return "fake"

    def trait_scores(self, trait: TraitSpec, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        self.calls += len(items)
        return [JudgeResult(self.trait_score if i % 2 == 0 else 100 - self.trait_score) for i in range(len(items))]

    def coherence_scores(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return [JudgeResult(self.coherence) for _ in items]


CFG = {
    "trait": "evil",
    "model": "tiny",
    "n_pairs": 2,
    "n_questions": 3,
    "samples_per_question": 1,
    "max_new_tokens": 6,
    "batch_size": 4,
    "judge": "fake",
}


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return tiny_model("llama")


def test_end_to_end_on_a_tiny_model(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    judge = PolarityJudge(trait_score=80)
    result = extract(ExtractConfig(**CFG, threshold=50), tmp_path / "run", model=model, judge=judge)
    assert result.n_rollouts == 2 * 2 * 3
    assert set(result.vectors) == {"response_mean", "prompt_mean", "prompt_last"}
    rollouts = [json.loads(x) for x in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 12 and {r["polarity"] for r in rollouts} == {"pos", "neg"}
    vec = ps.PersonaVector.load(result.vectors["response_mean"])
    assert vec.directions.shape == (model.num_layers + 1, model.hidden_size)
    assert vec.metadata["trait"] == "evil" and vec.metadata["method"] == "response_mean"
    assert vec.metadata["n_pos"] == result.kept["pos"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["steps"]["vectors"]["status"] == "done"
    assert manifest["model_fingerprint"] == model.fingerprint()


def test_vector_is_the_difference_of_kept_means(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    result = extract(ExtractConfig(**CFG, threshold=0), tmp_path / "run", model=model, judge=PolarityJudge())
    rows = [json.loads(x) for x in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]

    def convs(pol: str) -> list[list[dict[str, str]]]:
        return [
            [
                {"role": "system", "content": r["system"]},
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r["answer"]},
            ]
            for r in rows
            if r["polarity"] == pol and r["answer"].strip()
        ]

    pos = ps.capture(model, convs("pos"), reductions=["prompt_last"])["prompt_last"].mean(0)
    neg = ps.capture(model, convs("neg"), reductions=["prompt_last"])["prompt_last"].mean(0)
    got = ps.PersonaVector.load(result.vectors["prompt_last"]).directions
    torch.testing.assert_close(got, pos - neg, atol=1e-5, rtol=1e-4)


def test_resume_skips_finished_work(tmp_path: Path, model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    judge = PolarityJudge()
    cfg = ExtractConfig(**CFG, threshold=0)
    extract(cfg, tmp_path / "run", model=model, judge=judge)
    first = (tmp_path / "run" / "rollouts.jsonl").read_text()
    calls = judge.calls

    def no_generation(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a finished rollout was generated again")

    monkeypatch.setattr("personascope.pipelines.common.generate", no_generation)
    extract(cfg, tmp_path / "run", model=model, judge=judge)
    assert judge.calls == calls
    assert (tmp_path / "run" / "rollouts.jsonl").read_text() == first


def test_crash_mid_run_resumes_to_the_same_result(tmp_path: Path, model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cfg = ExtractConfig(**CFG, threshold=0)
    clean = extract(cfg, tmp_path / "clean", model=model, judge=PolarityJudge())
    real = extract_mod.run_judging

    def crash(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt  # killed after the rollouts were written

    monkeypatch.setattr(extract_mod, "run_judging", crash)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, tmp_path / "crashed", model=model, judge=PolarityJudge())
    with (tmp_path / "crashed" / "rollouts.jsonl").open("a") as fh:
        fh.write('{"key": "pos|0|0|0", "answer": "tor')  # and a torn line from the kill
    monkeypatch.setattr(extract_mod, "run_judging", real)
    resumed = extract(cfg, tmp_path / "crashed", model=model, judge=PolarityJudge())
    a = (tmp_path / "clean" / "rollouts.jsonl").read_text().splitlines()
    b = (tmp_path / "crashed" / "rollouts.jsonl").read_text().splitlines()
    assert a == b
    for method in clean.vectors:
        torch.testing.assert_close(
            ps.PersonaVector.load(clean.vectors[method]).directions,
            ps.PersonaVector.load(resumed.vectors[method]).directions,
        )


def test_resume_after_a_crash_mid_rollouts_writes_each_record_once(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    cfg = ExtractConfig(**CFG, threshold=0)
    clean = extract(cfg, tmp_path / "clean", model=model, judge=PolarityJudge())
    lines = (tmp_path / "clean" / "rollouts.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 12
    # the state a crash after five rollouts leaves: the manifest and the first five records (one chunk, part done)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "manifest.json").write_text((tmp_path / "clean" / "manifest.json").read_text())
    (crashed / "rollouts.jsonl").write_text("".join(lines[:5]))
    judge = PolarityJudge()
    resumed = extract(cfg, crashed, model=model, judge=judge)
    assert (crashed / "rollouts.jsonl").read_text().splitlines(keepends=True) == lines  # no record twice
    assert judge.calls == 12  # every rollout judged once
    assert resumed.kept == clean.kept
    for method in clean.vectors:
        torch.testing.assert_close(
            ps.PersonaVector.load(resumed.vectors[method]).directions,
            ps.PersonaVector.load(clean.vectors[method]).directions,
        )


def test_too_few_survivors_is_a_clear_error(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    judge = PolarityJudge(coherence=10)
    with pytest.raises(PersonascopeError, match=r"too few rollouts survived.*--judge none"):
        extract(ExtractConfig(**CFG), tmp_path / "run", model=model, judge=judge)


@pytest.mark.parametrize(
    ("polarity", "trait", "coherence", "kept"),
    [
        ("pos", 50.0, 50.0, True),  # at the thresholds
        ("pos", 49.9, 90.0, False),
        ("neg", 49.9, 90.0, True),  # neg needs trait < 100 - θ
        ("neg", 50.0, 90.0, False),
        ("pos", 90.0, 49.9, False),  # incoherent
        ("pos", None, 90.0, False),  # no score
    ],
)
def test_filter_edges(polarity, trait, coherence, kept) -> None:  # type: ignore[no-untyped-def]
    cfg = ExtractConfig(**CFG, threshold=50).resolved()
    record = {"polarity": polarity, "answer": "some text"}
    assert keep(record, {"trait": trait, "coherence": coherence}, cfg, judged=True) is kept


def test_filter_without_a_judge_keeps_non_empty_answers() -> None:
    cfg = ExtractConfig(**CFG).resolved()
    assert keep({"polarity": "pos", "answer": "x"}, None, cfg, judged=False)
    assert not keep({"polarity": "pos", "answer": "  "}, None, cfg, judged=False)


def test_profiles_and_bad_config() -> None:
    quick = ExtractConfig(trait="evil").resolved()
    assert quick.judge == "contrast:smollm2-135m-instruct" and quick.n_pairs == 5
    paper = ExtractConfig(trait="evil", profile="paper").resolved()
    assert (paper.n_questions, paper.samples_per_question, paper.max_new_tokens) == (20, 10, 1000)
    with pytest.raises(PersonascopeError, match="unknown profile"):
        ExtractConfig(trait="evil", profile="huge").resolved()
    with pytest.raises(PersonascopeError, match="at least 1"):
        ExtractConfig(trait="evil", n_questions=0).resolved()


@pytest.mark.slow
def test_quick_extraction_on_the_bundled_model(tmp_path: Path, bundled) -> None:  # type: ignore[no-untyped-def]
    cfg = ExtractConfig(trait="evil", n_pairs=2, n_questions=3, max_new_tokens=24, threshold=30)
    result = extract(cfg, tmp_path / "run", model=bundled)
    assert result.kept["pos"] >= 2 and result.kept["neg"] >= 2
    assert result.trait_means["pos"] is not None and result.trait_means["neg"] is not None
    vec = ps.PersonaVector.load(result.vectors["response_mean"])
    vec.check_compatible(bundled)
    assert vec.metadata["judge"] == "contrast:smollm2-135m-instruct"
    assert torch.isfinite(vec.directions).all() and vec.norms()[1:].min() > 0


class LengthJudge(PolarityJudge):
    """Trait score from the answer's length (deterministic and spread over 0..100); counts calls."""

    def trait_scores(self, trait: TraitSpec, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        self.calls += len(items)
        return [JudgeResult(float((7 * len(it.answer)) % 101)) for it in items]


def _counting_generate(monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    from personascope.pipelines import common

    calls: list[int] = []
    real = common.generate

    def counted(model, conversations, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(conversations))
        return real(model, conversations, **kwargs)

    monkeypatch.setattr(common, "generate", counted)
    return calls


def test_a_new_threshold_refilters_without_generating_or_judging(tmp_path: Path, model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    judge = LengthJudge()
    run = tmp_path / "run"
    first = extract(ExtractConfig(**CFG, threshold=0, min_kept=1), run, model=model, judge=judge)
    assert judge.calls == 12 and first.kept == {"pos": 6, "neg": 6}
    rollouts = (run / "rollouts.jsonl").read_text()
    scores = {s["key"]: s for s in map(json.loads, (run / "scores.jsonl").read_text().splitlines())}
    records = [json.loads(x) for x in rollouts.splitlines()]

    def by_hand(theta: float) -> dict[str, int]:
        kept = {"pos": 0, "neg": 0}
        for r in records:
            t = scores[r["key"]]["trait"]
            if r["answer"].strip() and (t >= theta if r["polarity"] == "pos" else t < 100 - theta):
                kept[r["polarity"]] += 1
        return kept

    theta = next(t for t in range(5, 100, 5) if min(by_hand(t).values()) >= 1 and by_hand(t) != first.kept)
    generated = _counting_generate(monkeypatch)
    said: list[str] = []
    again = extract(ExtractConfig(**CFG, threshold=theta, min_kept=1), run, model=model, judge=judge, say=said.append)
    assert generated == [] and judge.calls == 12  # no generation, no judge call
    assert again.kept == by_hand(theta) != first.kept
    assert (run / "rollouts.jsonl").read_text() == rollouts
    assert len(said) == 1 and said[0].startswith("re-running filter → vectors (filter: threshold changed)")
    vec = ps.PersonaVector.load(again.vectors["response_mean"])
    assert (vec.metadata["n_pos"], vec.metadata["n_neg"]) == (again.kept["pos"], again.kept["neg"])
    stale = list((run / "stale").iterdir())
    assert len(stale) == 1 and sorted(p.name for p in (stale[0] / "vectors").iterdir()) == sorted(
        p.name for p in again.vectors.values()
    )  # the old vectors were kept aside, not deleted
    # the same settings again: nothing runs
    said.clear()
    extract(ExtractConfig(**CFG, threshold=theta, min_kept=1), run, model=model, judge=judge, say=said.append)
    assert generated == [] and judge.calls == 12 and said == []


def test_a_new_temperature_redoes_the_rollouts(tmp_path: Path, model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    judge = PolarityJudge()
    run = tmp_path / "run"
    extract(ExtractConfig(**CFG, threshold=0), run, model=model, judge=judge)
    old = (run / "rollouts.jsonl").read_text()
    generated = _counting_generate(monkeypatch)
    extract(ExtractConfig(**CFG, threshold=0, temperature=0.5), run, model=model, judge=judge)
    assert sum(generated) == 12 and judge.calls == 24  # every rollout generated and judged again
    new = (run / "rollouts.jsonl").read_text()
    assert new != old and len(new.splitlines()) == 12
    (aside,) = (run / "stale").iterdir()
    assert (aside / "rollouts.jsonl").read_text() == old and (aside / "scores.jsonl").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["temperature"] == 0.5
    assert manifest["steps"]["rollouts"]["inputs"]["temperature"] == 0.5


def test_from_step_forces_that_step_and_the_rest(tmp_path: Path, model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    judge = PolarityJudge()
    cfg = ExtractConfig(**CFG, threshold=0)
    extract(cfg, tmp_path / "run", model=model, judge=judge)
    generated = _counting_generate(monkeypatch)
    extract(cfg, tmp_path / "run", model=model, judge=judge, rerun_from="scores")
    assert generated == [] and judge.calls == 24
    with pytest.raises(PersonascopeError, match=r"unknown step 'judge'.*rollouts, scores, filter, vectors"):
        extract(cfg, tmp_path / "run", model=model, judge=judge, rerun_from="judge")


def test_a_run_from_before_step_digests_resumes_when_its_config_matches(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    cfg = ExtractConfig(**CFG, threshold=0)
    judge = PolarityJudge()
    extract(cfg, tmp_path / "run", model=model, judge=judge)
    manifest_path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["steps"].values():  # what an older personascope wrote: statuses, no digests
        entry.pop("digest"), entry.pop("inputs")
    manifest_path.write_text(json.dumps(manifest))
    extract(cfg, tmp_path / "run", model=model, judge=judge)
    assert judge.calls == 12 and not (tmp_path / "run" / "stale").exists()
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(PersonascopeError, match=r"different config \(threshold differ\).*--from STEP"):
        extract(ExtractConfig(**CFG, threshold=10), tmp_path / "run", model=model, judge=judge)


def test_a_damaged_middle_rollout_is_redone_and_the_result_is_unchanged(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    cfg = ExtractConfig(**CFG, threshold=0)
    clean = extract(cfg, tmp_path / "clean", model=model, judge=PolarityJudge())
    run = tmp_path / "damaged"
    extract(cfg, run, model=model, judge=PolarityJudge())
    lines = (run / "rollouts.jsonl").read_text().splitlines(keepends=True)
    damaged_key = json.loads(lines[5])["key"]
    lines[5] = lines[5][: len(lines[5]) // 2] + "\n"  # one record in the middle cut in half
    (run / "rollouts.jsonl").write_text("".join(lines))
    resumed = extract(cfg, run, model=model, judge=PolarityJudge())
    assert (run / "rollouts.jsonl.corrupt").read_text() == lines[5]
    by_key = {json.loads(x)["key"]: x for x in (run / "rollouts.jsonl").read_text().splitlines()}
    clean_by_key = {json.loads(x)["key"]: x for x in (tmp_path / "clean" / "rollouts.jsonl").read_text().splitlines()}
    assert by_key == clean_by_key and damaged_key in by_key  # regenerated, identical (seeded per job)
    assert resumed.kept == clean.kept
    for method in clean.vectors:
        torch.testing.assert_close(
            ps.PersonaVector.load(resumed.vectors[method]).directions,
            ps.PersonaVector.load(clean.vectors[method]).directions,
        )
