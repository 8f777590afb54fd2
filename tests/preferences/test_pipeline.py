from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from personascope.errors import PersonascopeError
from personascope.preferences.pipeline import (
    ElicitConfig,
    open_run,
    run_elicit,
    run_fit,
    run_personas,
    run_probe,
    run_steer,
    select_tasks,
    steering_pairs,
)
from personascope.preferences.tasks import load_tasks
from personascope.vectors import PersonaVector
from tests.preferences.helpers import planted_logprob_fn


def fake_embed(texts: list[str]) -> np.ndarray:
    return np.random.default_rng(len(texts)).normal(size=(len(texts), 6))


def planted_utilities(seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {t.text: float(rng.normal()) for t in load_tasks()}


def test_end_to_end_on_a_tiny_model(llama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    cfg = ElicitConfig(personas=["assistant", "evil"], n_tasks=28, budget=42, batch_pairs=14, batch_size=32)
    res = run_elicit(cfg, out, model=llama, progress=False)
    assert res.n_tasks == 28 and set(res.per_persona) == {"assistant", "evil"}
    info = res.per_persona["assistant"]
    assert info["n_pairs"] <= 42 and info["asked_model"] == info["n_pairs"] and 0 <= info["position_bias"] <= 1
    records = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert {r["persona"] for r in records} == {"assistant", "evil"}
    assert all(0 <= r["p"] <= 1 and r["key"] == f"{r['persona']}|{r['a']}|{r['b']}" for r in records)

    fit = run_fit(out)
    assert set(fit.metrics) == {"assistant", "evil"}
    assert 0 <= fit.metrics["evil"]["test_accuracy"] <= 1 and fit.metrics["evil"]["ceiling_log_loss"] > 0
    with (out / "utilities-evil.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 28 and abs(np.mean([float(r["mu"]) for r in rows])) < 1e-6
    assert json.loads((out / "fit.json").read_text())["personas"]["assistant"]["n_pairs"] > 0

    probe = run_probe(out, model=llama, embed_fn=fake_embed, alphas=(0.1, 10.0, 1000.0))
    report = probe.report
    assert [s.layer for s in report.layers] == list(range(llama.num_layers + 1))
    assert set(report.baselines) == {"embedding", "topic"}
    for key in ("csv", "md", "json", "png", "vector"):
        assert probe.files[key].is_file() and probe.files[key].stat().st_size > 0
    vec = PersonaVector.load(probe.files["vector"])
    assert vec.chosen_layer == report.best_layer and vec.metadata["persona"] == "assistant"
    summary = json.loads(probe.files["json"].read_text())
    assert summary["best_layer"] == report.best_layer and "embedding" in summary["baselines"]
    assert "layer" in probe.files["md"].read_text()

    personas = run_personas(out, model=llama, alphas=(1.0, 100.0))
    assert personas.names == ["assistant", "evil"] and personas.probe_r.shape == (2, 2)
    np.testing.assert_allclose(np.diag(personas.utility_r), 1.0)
    np.testing.assert_allclose(personas.utility_r, personas.utility_r.T)
    assert (out / "persona-matrix.png").stat().st_size > 0
    assert len(json.loads((out / "persona-matrix.json").read_text())["probe_r"]) == 2

    steer = run_steer(out, model=llama, layers=[1, 2], coefs=[-1.0, 1.0], n_pairs=2, progress=False)
    assert len(steer.swings) == 2 * 3 and len(steer.pairs) == 2
    assert {p.direction for p in steer.points} == {"none", "probe", "random"}
    assert all(0 <= p.p <= 1 for p in steer.points)
    assert (out / "steer.png").stat().st_size > 0
    data = json.loads((out / "steer.json").read_text())
    assert set(data["residual_norms"]) == {"1", "2"} and len(data["swings"]) == 6
    n_records = len((out / "steer.jsonl").read_text().splitlines())
    again = run_steer(out, model=llama, layers=[1, 2], coefs=[-1.0, 1.0], n_pairs=2, progress=False)
    assert len((out / "steer.jsonl").read_text().splitlines()) == n_records  # resumed: nothing recomputed
    assert [p.p for p in again.points] == [p.p for p in steer.points]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"elicit:assistant", "fit", "probe:assistant", "personas", "steer:assistant"} <= set(manifest["steps"])


def test_fit_recovers_planted_utilities_and_agrees_with_choix(llama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import choix

    utils = planted_utilities()
    cfg = ElicitConfig(n_tasks=40, batch_size=64)
    run_elicit(cfg, tmp_path / "r", model=llama, logprob_fn=planted_logprob_fn(utils, bias=1.5), progress=False)
    fit = run_fit(tmp_path / "r")
    prefs = open_run(tmp_path / "r")
    truth = np.array([utils[t.text] for t in prefs.tasks])
    mu = fit.utilities["assistant"]
    assert np.corrcoef(mu, truth)[0, 1] > 0.95
    assert fit.metrics["assistant"]["test_accuracy"] >= 0.8
    index = {t.id: i for i, t in enumerate(prefs.tasks)}
    data = []
    for r in prefs.run.records("pairs"):
        wins = round(10 * r["p"])
        data += [(index[r["a"]], index[r["b"]])] * wins + [(index[r["b"]], index[r["a"]])] * (10 - wins)
    bt = choix.ilsr_pairwise(len(prefs.tasks), data, alpha=0.01)
    assert spearmanr(bt, mu).statistic > 0.95


def test_elicit_resumes_after_a_crash_without_asking_again(llama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    utils = planted_utilities(1)
    cfg = ElicitConfig(n_tasks=24, budget=60, batch_pairs=12, batch_size=4)  # chunks of 16 pairs
    whole = tmp_path / "whole"
    run_elicit(cfg, whole, model=llama, logprob_fn=planted_logprob_fn(utils), progress=False)
    reference = (whole / "pairs.jsonl").read_text()

    calls: list[int] = []
    good = planted_logprob_fn(utils, calls=calls)

    def crashing(*args, **kwargs):  # type: ignore[no-untyped-def]
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return good(*args, **kwargs)

    part = tmp_path / "part"
    with pytest.raises(RuntimeError, match="power cut"):
        run_elicit(cfg, part, model=llama, logprob_fn=crashing, progress=False)
    saved = len((part / "pairs.jsonl").read_text().splitlines())
    assert saved == 24  # the initial graph (two chunks); the first active round crashed
    calls.clear()
    run_elicit(cfg, part, model=llama, logprob_fn=good, progress=False)
    total = len(reference.splitlines())
    assert total > saved
    assert sum(calls) == 2 * (total - saved)  # both orders of only the pairs not yet answered
    assert (part / "pairs.jsonl").read_text() == reference
    calls.clear()
    res = run_elicit(cfg, part, model=llama, logprob_fn=good, progress=False)
    assert calls == [] and res.per_persona["assistant"]["n_pairs"] == total
    with pytest.raises(PersonascopeError, match="different config"):
        run_elicit(ElicitConfig(n_tasks=25, budget=60), part, model=llama, logprob_fn=good, progress=False)


def test_task_selection_stratifies_splits_and_topics() -> None:
    tasks = load_tasks()
    chosen = select_tasks(tasks, 42, None, seed=0)
    assert len(chosen) == 42 and len({t.id for t in chosen}) == 42
    assert {t.split for t in chosen} == {"train", "val", "test"}
    assert sum(t.split == "val" for t in chosen) >= 3 and sum(t.split == "test" for t in chosen) >= 3
    counts = [sum(t.topic == name for t in chosen) for name in {t.topic for t in tasks}]
    assert min(counts) >= 2 and max(counts) <= 4
    assert select_tasks(tasks, 42, None, seed=0) == chosen
    coding = select_tasks(tasks, None, ["coding"], seed=0)
    assert coding and all(t.topic == "coding" for t in coding)
    assert select_tasks(tasks, None, None, 0) == tasks


def test_steering_pairs_are_close_held_out_and_disjoint() -> None:
    tasks = load_tasks()[:40]
    mu = np.linspace(-2, 2, 40)
    pairs = steering_pairs(tasks, mu, 5, seed=0)
    assert len(pairs) == 5
    used = [i for p in pairs for i in p]
    assert len(set(used)) == 10 and all(tasks[i].split in ("val", "test") for i in used)


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_input_is_one_clear_error(llama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dup = _write(
        tmp_path / "dup.jsonl", [{"id": "t1", "text": "a", "topic": "x"}, {"id": "t1", "text": "b", "topic": "x"}]
    )
    with pytest.raises(PersonascopeError, match="duplicate task ids"):
        run_elicit(ElicitConfig(tasks_file=str(dup)), tmp_path / "a", model=llama)
    bad_split = _write(tmp_path / "split.jsonl", [{"id": "t1", "text": "a", "topic": "x", "split": "dev"}])
    with pytest.raises(PersonascopeError, match="unknown split"):
        run_elicit(ElicitConfig(tasks_file=str(bad_split)), tmp_path / "b", model=llama)
    with pytest.raises(PersonascopeError, match="unknown topic 'gardening'"):
        run_elicit(ElicitConfig(topics=["gardening"]), tmp_path / "c", model=llama)
    personas = tmp_path / "personas.json"
    personas.write_text(json.dumps([{"name": "mute", "description": "says nothing"}]))
    with pytest.raises(PersonascopeError, match="system_prompt"):
        run_elicit(ElicitConfig(personas=["mute"], personas_file=str(personas)), tmp_path / "d", model=llama)
    with pytest.raises(PersonascopeError, match="unknown persona 'pirate'"):
        run_elicit(ElicitConfig(personas=["pirate"]), tmp_path / "e", model=llama)
    with pytest.raises(PersonascopeError, match="choice mode"):
        run_elicit(ElicitConfig(mode="telepathy"), tmp_path / "f", model=llama)
    assert not any((tmp_path / x).exists() for x in "abcdef")

    utils = planted_utilities()
    out = tmp_path / "run"
    run_elicit(ElicitConfig(n_tasks=12, budget=20), out, model=llama, logprob_fn=planted_logprob_fn(utils))
    with pytest.raises(PersonascopeError, match="prefs fit"):
        run_probe(out, model=llama, embed=False)
    ids = [t.id for t in open_run(out).tasks]
    missing = _write(tmp_path / "pairs.jsonl", [{"persona": "assistant", "a": ids[0], "b": "no-such-task", "p": 0.7}])
    with pytest.raises(PersonascopeError, match="'no-such-task' is not one of the run's tasks"):
        run_fit(out, pairs_file=missing)
    bad_p = _write(tmp_path / "p.jsonl", [{"persona": "assistant", "a": ids[0], "b": ids[1], "p": 1.5}])
    with pytest.raises(PersonascopeError, match="not a probability"):
        run_fit(out, pairs_file=bad_p)
    run_fit(out)
    with pytest.raises(PersonascopeError, match="not part of this run"):
        run_probe(out, persona="evil", model=llama, embed=False)
    with pytest.raises(PersonascopeError, match="at least two"):
        run_personas(out, model=llama)
    with pytest.raises(PersonascopeError, match="prefs probe"):
        run_steer(out, model=llama)
    with pytest.raises(PersonascopeError, match="not a run directory"):
        open_run(tmp_path)
    from personascope.testing import tiny_model

    with pytest.raises(PersonascopeError, match="another model"):
        run_probe(out, model=tiny_model("llama", seed=5), embed=False)
