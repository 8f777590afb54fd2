from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.torch import load_file
from scipy import stats
from scipy.stats import spearmanr

from personascope.errors import PersonascopeError
from personascope.preferences.elicit import task_conversation
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
from personascope.residual.capture import capture
from personascope.vectors import PersonaVector
from tests.figures import keep_figures
from tests.preferences.helpers import planted_logprob_fn


def fake_embed(texts: list[str]) -> np.ndarray:
    return np.random.default_rng(len(texts)).normal(size=(len(texts), 6))


def planted_utilities(seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {t.text: float(rng.normal()) for t in load_tasks()}


def _keep_figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Keep every Figure the report plots save (they are still written to disk)."""
    import personascope.report.prefs_plots as prefs_plots

    return keep_figures(monkeypatch, prefs_plots)


def _r(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r; nan when either side is constant up to rounding."""
    if np.ptp(a) <= 1e-9 * max(1.0, float(np.abs(a).max())) or np.ptp(b) == 0:
        return float("nan")
    return float(stats.pearsonr(a, b).statistic)


def _sklearn_probe(x_tr, y_tr, x_va, y_va, alphas):  # type: ignore[no-untyped-def]
    """Standardised ridge (sklearn), α chosen by validation r (ties and nan: the larger α)."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best = None
    for alpha in sorted(alphas):
        model = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x_tr, y_tr)
        r = _r(model.predict(x_va), y_va)
        score = -np.inf if np.isnan(r) else r
        if best is None or score >= best[0]:
            best = (score, model)
    return best[1], (best[0] if np.isfinite(best[0]) else float("nan"))


def _pair_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    right = total = 0.0
    for i in range(len(true)):
        for j in range(i + 1, len(true)):
            if true[i] == true[j]:
                continue
            total += 1
            d = pred[i] - pred[j]
            right += 0.5 if d == 0 else float(np.sign(d) == np.sign(true[i] - true[j]))
    return right / total


def test_end_to_end_on_a_tiny_model(llama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    figures = _keep_figures(monkeypatch)
    out = tmp_path / "run"
    cfg = ElicitConfig(personas=["assistant", "evil"], n_tasks=28, budget=42, batch_pairs=14, batch_size=32)
    res = run_elicit(cfg, out, model=llama, progress=False)
    assert res.n_tasks == 28 and set(res.per_persona) == {"assistant", "evil"}
    records = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert {r["persona"] for r in records} == {"assistant", "evil"}
    for r in records:  # each pair is asked in both orders: p = mean P(first task) over them
        assert r["key"] == f"{r['persona']}|{r['a']}|{r['b']}"
        assert r["p"] == pytest.approx(0.5 * (r["p_ab"] + 1 - r["p_ba"])) and 0 <= r["p"] <= 1
    for name, info in res.per_persona.items():
        mine = [r for r in records if r["persona"] == name]
        assert info["n_pairs"] == info["asked_model"] == len(mine) <= 42
        assert info["position_bias"] == pytest.approx(np.mean([0.5 * (r["p_ab"] + r["p_ba"]) for r in mine]))
    prefs = open_run(out)
    tasks = prefs.tasks
    index = {t.id: i for i, t in enumerate(tasks)}

    fit = run_fit(out)
    assert set(fit.metrics) == {"assistant", "evil"}
    assert 0 <= fit.metrics["evil"]["test_accuracy"] <= 1 and fit.metrics["evil"]["ceiling_log_loss"] > 0
    utils: dict[str, np.ndarray] = {}
    for name in ("assistant", "evil"):
        with (out / f"utilities-{name}.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert [r["id"] for r in rows] == [t.id for t in tasks]
        utils[name] = np.array([float(r["mu"]) for r in rows])
        np.testing.assert_allclose(utils[name], fit.utilities[name], atol=1e-6)
        assert abs(utils[name].mean()) < 1e-5
        mine = [r for r in records if r["persona"] == name]
        counts = np.bincount([index[r[side]] for r in mine for side in ("a", "b")], minlength=28)
        assert [int(r["n_comparisons"]) for r in rows] == counts.tolist()
        assert json.loads((out / "fit.json").read_text())["personas"][name]["n_pairs"] == len(mine)

    alphas = (0.1, 10.0, 1000.0)
    probe = run_probe(out, model=llama, embed_fn=fake_embed, alphas=alphas)
    report = probe.report
    assert [s.layer for s in report.layers] == list(range(llama.num_layers + 1))
    assert set(report.baselines) == {"embedding", "topic"}
    # the cached activations: the last prompt token of each task's single-task prompt under the persona
    feats: dict[str, np.ndarray] = {}
    for persona in prefs.personas:
        convs = [task_conversation(t.text, persona.system_prompt) for t in tasks]
        feats[persona.name] = capture(llama, convs, reductions=["prompt_last"])["prompt_last"].numpy().astype(float)
    cached = load_file(str(out / "activations-assistant.safetensors"))["prompt_last"].numpy()
    np.testing.assert_allclose(cached, feats["assistant"], atol=1e-5)
    # every layer's test r and pairwise accuracy against an sklearn probe trained and tuned the same way
    split = np.array([t.split for t in tasks])
    tr, va, te = split == "train", split == "val", split == "test"
    x, y = feats["assistant"], utils["assistant"]
    test_r, pair_acc = [], []
    for layer in range(llama.num_layers + 1):
        model, _ = _sklearn_probe(x[tr, layer], y[tr], x[va, layer], y[va], alphas)
        pred = model.predict(x[te, layer])
        test_r.append(_r(pred, y[te]))
        pair_acc.append(_pair_accuracy(pred, y[te]))
    np.testing.assert_allclose([s.test_r for s in report.layers], test_r, atol=1e-5)
    np.testing.assert_allclose([s.test_pair_acc for s in report.layers], pair_acc, atol=1e-9)
    with probe.files["csv"].open() as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 * (llama.num_layers + 1) + 2
    vec = PersonaVector.load(probe.files["vector"])
    assert vec.chosen_layer == report.best_layer and vec.metadata["persona"] == "assistant"
    # unit directions (zero where the probe has none: layer 0 sees the same last prompt token for every task)
    nonzero = (np.linalg.norm(report.directions, axis=-1) > 0).astype(float)
    assert nonzero[1:].all()
    np.testing.assert_allclose(vec.directions.norm(dim=-1).numpy(), nonzero, atol=1e-5)
    d = report.directions[report.best_layer]
    np.testing.assert_allclose(vec.directions[report.best_layer].numpy(), d / np.linalg.norm(d), atol=1e-5)
    summary = json.loads(probe.files["json"].read_text())
    assert summary["best_layer"] == report.best_layer and set(summary["baselines"]) == {"embedding", "topic"}
    assert summary["n_tasks"] == 28 and summary["alphas"] == list(alphas)
    assert probe.files["md"].read_text().count("(best)") == 1
    # the probe plot: test r, pooled / within-topic leave-topic-out r and the shuffled control per layer
    fig = figures.pop(0)
    assert fig.texts[0].get_text() == f"utility probes (assistant, {llama.name})"
    ax_r, ax_acc = fig.axes
    assert [line.get_label() for line in ax_r.lines[:4]] == [
        "probe: test r",
        "probe: leave-topic-out r (pooled)",
        "probe: leave-topic-out r (within)",
        "shuffled labels: test r",
    ]
    layers = list(range(llama.num_layers + 1))
    np.testing.assert_allclose(ax_r.lines[0].get_xydata(), np.column_stack([layers, test_r]), atol=1e-5)
    np.testing.assert_allclose(ax_r.lines[3].get_ydata(), [s.test_r for s in report.shuffled])
    np.testing.assert_allclose(ax_acc.lines[0].get_ydata(), pair_acc, atol=1e-9)
    assert ax_acc.get_ylabel() == "pairwise accuracy (test tasks)"

    personas = run_personas(out, model=llama, alphas=(1.0, 100.0))
    assert personas.names == ["assistant", "evil"]
    names = personas.names
    want_utility = np.array([[_r(utils[a], utils[b]) for b in names] for a in names])
    want_baseline = np.array([[_r(utils[a][te], utils[b][te]) for b in names] for a in names])
    np.testing.assert_allclose(personas.utility_r, want_utility, atol=1e-6)
    np.testing.assert_allclose(personas.baseline_r, want_baseline, atol=1e-6)
    # probe transfer: each source's probe at its best-validation layer (the first, on ties), scored on each target
    want_probe = np.full((2, 2), np.nan)
    for i, src in enumerate(names):
        fits = [
            _sklearn_probe(feats[src][tr, k], utils[src][tr], feats[src][va, k], utils[src][va], (1.0, 100.0))
            for k in layers
        ]
        scores = [-np.inf if np.isnan(v) else v for _, v in fits]
        chosen = int(np.argmax(scores))
        assert personas.layers[src] == chosen
        for j, dst in enumerate(names):
            want_probe[i, j] = _r(fits[chosen][0].predict(feats[dst][te, chosen]), utils[dst][te])
    np.testing.assert_allclose(personas.probe_r, want_probe, atol=1e-5)
    matrix = json.loads((out / "persona-matrix.json").read_text())
    np.testing.assert_allclose(np.array(matrix["utility_r"], dtype=float), want_utility, atol=1e-6)
    fig = figures.pop(0)
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in heatmaps] == [
        "utility correlation (all tasks)",
        "probe trained on row, tested on column",
        "row utilities predicting column (test)",
    ]
    for ax, want in zip(heatmaps, (want_utility, want_probe, want_baseline), strict=True):
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), want, atol=1e-5)

    steer = run_steer(out, model=llama, layers=[1, 2], coefs=[-1.0, 1.0], n_pairs=2, progress=False)
    assert len(steer.pairs) == 2
    steer_records = [json.loads(line) for line in (out / "steer.jsonl").read_text().splitlines()]
    assert len(steer_records) == 2 * (1 + 2 * 3 * 2)  # 2 pairs × (baseline + 2 layers × 3 curves × 2 coefficients)
    by_cell: dict[tuple[str, str, int | None, float], list[float]] = {}
    for r in steer_records:
        by_cell.setdefault((r["direction"], r["mode"], r["layer"], float(r["coef"])), []).append(r["p"])
    assert {(p.direction, p.mode, p.layer, p.coef) for p in steer.points} == set(by_cell)
    for point in steer.points:
        assert point.n == 2 and point.p == pytest.approx(
            np.mean(by_cell[point.direction, point.mode, point.layer, point.coef])
        )
    curves = [("probe", "differential"), ("probe", "single"), ("random", "differential")]
    want_swings = [
        {
            "direction": dr,
            "mode": mo,
            "layer": la,
            "swing": pytest.approx(np.mean(by_cell[dr, mo, la, 1.0]) - np.mean(by_cell[dr, mo, la, -1.0])),
        }
        for la in (1, 2)
        for dr, mo in curves
    ]
    assert steer.swings == want_swings
    data = json.loads((out / "steer.json").read_text())
    norms = {str(la): float(np.linalg.norm(feats["assistant"][:, la], axis=-1).mean()) for la in (1, 2)}
    assert data["residual_norms"] == pytest.approx(norms, rel=1e-5) and len(data["swings"]) == 6
    assert data["baseline_p"] == pytest.approx(np.mean(by_cell["none", "none", None, 0.0]))
    fig = figures.pop(0)
    assert [ax.get_title() for ax in fig.axes] == ["layer 1", "layer 2"]
    base_p = np.mean(by_cell["none", "none", None, 0.0])
    for ax, layer in zip(fig.axes, (1, 2), strict=True):
        assert [c.get_label() for c in ax.containers] == [
            "probe, differential",
            "probe, one task",
            "random, differential",
        ]
        for container, (dr, mo) in zip(ax.containers, curves, strict=True):
            want = [
                [-1.0, np.mean(by_cell[dr, mo, layer, -1.0])],
                [0.0, base_p],
                [1.0, np.mean(by_cell[dr, mo, layer, 1.0])],
            ]
            np.testing.assert_allclose(container.lines[0].get_xydata(), want)
    assert figures == []
    again = run_steer(out, model=llama, layers=[1, 2], coefs=[-1.0, 1.0], n_pairs=2, progress=False)
    assert len((out / "steer.jsonl").read_text().splitlines()) == len(steer_records)  # resumed: nothing recomputed
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
