"""Monitoring experiments: does the last prompt token's projection predict the trait of the coming answer?

Two designs from the persona-vector paper, each resumable in a run directory (rollouts and scores as JSONL, the
judge's SQLite cache reused):

- ``prompts`` — system-prompt interpolation: the trait's ladder of 8 system prompts, from strongly suppressing to
  strongly encouraging, each in front of every evaluation question;
- ``manyshot`` — 0, 2, 4, 8, 16 in-context question/answer examples that show the trait (from the trait's labelled
  set), and the same counts of trait-free examples as a control, before every evaluation question.

Each *point* (prompt) gets its projection at every layer and the mean trait score of its sampled answers. Reported:
Pearson r (bootstrap 95% CI) between projection and score over all points, and within each rung / shot count (the
paper notes the signal is weaker inside one prompt type), per layer, and the best layer for monitoring.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from personascope.errors import PersonascopeError
from personascope.pipelines.common import Job, build_judge, run_generation, run_judging
from personascope.pipelines.monitor import project
from personascope.report.stats import pearson_ci
from personascope.runs import RunDir
from personascope.traits import TraitSpec, load_labelled, load_trait
from personascope.vectors import PersonaVector

Kind = Literal["prompts", "manyshot"]


@dataclass
class MonitorExperimentConfig:
    kind: str
    vector: str
    model: str = "smollm2-135m-instruct"
    judge: str | None = None
    trait: str | None = None
    n_questions: int = 10
    samples_per_question: int = 2
    max_new_tokens: int = 48
    temperature: float = 1.0
    shots: list[int] = field(default_factory=lambda: [0, 2, 4, 8, 16])
    seed: int = 0
    batch_size: int = 16


@dataclass
class Point:
    key: str
    group: str
    order: int  # position of the group on its axis (rung index or shot count; control shots negative)
    question: str
    conversation: list[dict[str, str]]


@dataclass
class MonitorExperimentResult:
    run_dir: Path
    best_layer: int
    r: float
    r_ci: tuple[float, float]
    within: dict[str, float]
    mean_within: float
    n_points: int
    r_by_layer: list[float]
    seconds: float


def build_points(kind: str, trait: TraitSpec, cfg: MonitorExperimentConfig) -> list[Point]:
    questions = trait.evaluation_questions[: cfg.n_questions]
    points: list[Point] = []
    if kind == "prompts":
        if len(trait.monitor_ladder) != 8:
            raise PersonascopeError(f"trait '{trait.name}' has no 8-rung monitor_ladder; add one to its spec")
        for r, system in enumerate(trait.monitor_ladder):
            for q, question in enumerate(questions):
                ladder_conv = [{"role": "system", "content": system}, {"role": "user", "content": question}]
                points.append(Point(f"rung{r}|{q}", f"rung {r}", r, question, ladder_conv))
        return points
    if kind != "manyshot":
        raise PersonascopeError(f"unknown monitoring experiment '{kind}'; use prompts or manyshot")
    labelled = load_labelled(trait.name)
    pools = {"trait": [x for x in labelled if x.label == 1], "control": [x for x in labelled if x.label == 0]}
    if any(k > min(len(p) for p in pools.values()) for k in cfg.shots):
        raise PersonascopeError(f"at most {min(len(p) for p in pools.values())} shots are available for {trait.name}")
    for k in sorted(set(cfg.shots)):
        for pool_name in ("trait", "control") if k > 0 else ("none",):
            for q, question in enumerate(questions):
                rng = random.Random(f"{cfg.seed}|{k}|{q}")  # the same examples for a question whatever else runs
                examples = rng.sample(pools[pool_name], k) if k else []
                conv: list[dict[str, str]] = []
                for ex in examples:
                    conv += [{"role": "user", "content": ex.question}, {"role": "assistant", "content": ex.answer}]
                conv.append({"role": "user", "content": question})
                group = "0 shots" if k == 0 else f"{k} {pool_name} shots"
                points.append(Point(f"{pool_name}{k}|{q}", group, k if pool_name != "control" else -k, question, conv))
    return points


def run_monitor_experiment(
    cfg: MonitorExperimentConfig, out: str | Path, *, overwrite: bool = False, model: Any = None, judge: Any = None
) -> MonitorExperimentResult:
    from personascope.models import load_model

    started = time.perf_counter()
    vector = PersonaVector.load(cfg.vector)
    trait = load_trait(cfg.trait or vector.trait or "")
    m = model if model is not None else load_model(cfg.model)
    vector.check_compatible(m)
    points = build_points(cfg.kind, trait, cfg)
    judge_spec = cfg.judge or f"contrast:{cfg.model}"
    if judge_spec == "none":
        raise PersonascopeError("a monitoring experiment needs trait scores; choose a judge other than 'none'")
    run = RunDir(out, asdict(cfg) | {"judge": judge_spec}, overwrite=overwrite, kind=f"monitor-{cfg.kind}")
    run.note("model_fingerprint", m.fingerprint())
    judge_obj = judge if judge is not None else build_judge(judge_spec, m)

    projections = project(m, [p.conversation for p in points], vector, batch_size=cfg.batch_size)  # [P, L+1]
    jobs = [
        Job(
            key=f"{p.key}|{s}",
            conversation=p.conversation,
            fields={"point": p.key, "group": p.group, "sample": s, "question": p.question},
            seed=cfg.seed + 7919 * i + s,
        )
        for i, p in enumerate(points)
        for s in range(cfg.samples_per_question)
    ]
    records = run_generation(
        run,
        "rollouts",
        m,
        jobs,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=1.0,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        desc=f"{trait.name} {cfg.kind} rollouts",
    )
    scores = run_judging(run, "scores", judge_obj, trait, records, desc=f"{trait.name} {cfg.kind} judging")
    per_point: dict[str, list[float]] = {}
    for rec in records:
        score = scores.get(rec["key"], {}).get("trait")
        if score is not None:
            per_point.setdefault(rec["point"], []).append(float(score))
    kept = [i for i, p in enumerate(points) if p.key in per_point]
    if len(kept) < 3:
        raise PersonascopeError("fewer than 3 prompts got a trait score; check the judge")
    y = np.array([float(np.mean(per_point[points[i].key])) for i in kept])
    x_all = projections[kept].numpy()  # [P', L+1]
    groups = [points[i].group for i in kept]
    r_by_layer = [_r(x_all[:, layer], y) for layer in range(x_all.shape[1])]
    candidates = [layer for layer in range(1, len(r_by_layer)) if not math.isnan(r_by_layer[layer])]
    if not candidates:
        raise PersonascopeError("projections or scores do not vary; no correlation can be computed")
    best = max(candidates, key=lambda layer: r_by_layer[layer])
    r_best, low, high = pearson_ci(x_all[:, best].tolist(), y.tolist(), seed=cfg.seed)
    within = {}
    for g in dict.fromkeys(groups):
        idx = [i for i, gg in enumerate(groups) if gg == g]
        within[g] = _r(x_all[idx, best], y[idx])
    finite = [v for v in within.values() if not math.isnan(v)]
    mean_within = float(np.mean(finite)) if finite else float("nan")
    _write(run, points, kept, projections, y, groups, best, r_by_layer, trait.name, cfg.kind)
    result = MonitorExperimentResult(
        run.path, best, r_best, (low, high), within, mean_within, len(kept), r_by_layer, time.perf_counter() - started
    )
    with (run.file("summary.json")).open("w") as fh:
        json.dump(asdict(result) | {"run_dir": str(run.path)}, fh, indent=2, default=float)
    run.step("experiment", "done", best_layer=best, r=r_best)
    return result


def _r(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _write(
    run: RunDir,
    points: list[Point],
    kept: list[int],
    projections: torch.Tensor,
    y: np.ndarray,
    groups: list[str],
    best: int,
    r_by_layer: list[float],
    trait: str,
    kind: str,
) -> None:
    import csv

    from personascope.io import atomic_open
    from personascope.report.plots import plot_r_by_layer, plot_scatter

    with atomic_open(run.file("points.csv")) as fh:
        writer = csv.writer(fh)
        writer.writerow(["point", "group", "question", "trait_score", f"projection_layer_{best}"])
        for j, i in enumerate(kept):
            writer.writerow(
                [
                    points[i].key,
                    points[i].group,
                    points[i].question,
                    f"{y[j]:.3f}",
                    f"{float(projections[i, best]):.4f}",
                ]
            )
    x = [float(projections[i, best]) for i in kept]
    plot_scatter(
        x,
        list(y),
        groups,
        run.file("scatter.png"),
        xlabel=f"last-prompt-token projection (layer {best})",
        ylabel="trait score of the answers",
        title=f"{trait}: {kind} (r = {_r(np.array(x), y):.2f})",
    )
    plot_r_by_layer(r_by_layer, run.file("r_by_layer.png"), title=f"{trait}: {kind}, r by layer")
