"""Steering evaluation and layer choice: a layers × coefficients grid on held-out evaluation questions.

For each layer, every coefficient (positive and negative) is generated in the same batches, one per-row
coefficient per conversation; coefficient 0 is the unsteered baseline and is shared by all layers (adding ``0·v``
leaves the stream untouched). A random direction of the same norm at each layer is the control. Each cell reports
the mean trait and coherence scores with 95% t-intervals; the recommended layer and coefficient give the largest
trait increase over the baseline while mean coherence stays at or above the threshold, and are written into the
vector's metadata.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from personascope.errors import PersonascopeError
from personascope.pipelines.common import Job, build_judge, run_generation, run_judging
from personascope.report.stats import mean_ci
from personascope.residual.interventions import Add, Intervention, resolve_direction
from personascope.residual.positions import check_positions
from personascope.runs import RunDir, Step
from personascope.traits import load_trait
from personascope.vectors import PersonaVector


@dataclass
class SweepConfig:
    vector: str
    model: str = "smollm2-135m-instruct"
    judge: str | None = None  # default: contrast judge on the same model
    trait: str | None = None  # default: the vector's trait
    layers: list[int] | None = None  # default: a third, half and two thirds of the depth
    coefs: list[float] = field(default_factory=lambda: [-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0])
    positions: str = "last_prompt_and_response"
    n_questions: int = 10
    samples_per_question: int = 1
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    coherence_threshold: float = 50.0
    random_control: bool = True
    seed: int = 0
    batch_size: int = 32


@dataclass
class Cell:
    direction: str  # "vector" or "random"
    layer: int | None  # None for the shared baseline
    coef: float
    trait: float
    trait_ci: float
    coherence: float
    coherence_ci: float
    n: int


@dataclass
class SweepResult:
    run_dir: Path
    cells: list[Cell]
    recommended: dict[str, Any] | None
    monotone: dict[int, dict[str, bool]]
    seconds: float


def default_layers(num_layers: int) -> list[int]:
    return sorted({max(1, round(num_layers * f)) for f in (1 / 3, 1 / 2, 2 / 3)})


def sweep_steps(cfg: SweepConfig, vector: PersonaVector, trait: Any, model_id: str, judge_spec: str) -> list[Step]:
    """The sweep's steps: generate → scores → recommend.

    Replies are keyed by (direction, layer, coefficient, question, sample), so adding layers, coefficients,
    questions or samples only adds replies; what changes a reply's content (the vector's directions, sampling,
    positions) redoes the generations. The vector's chosen layer/coefficient, which the sweep itself writes back into
    the file, is not an input.
    """
    directions = hashlib.sha256(vector.directions.numpy().tobytes()).hexdigest()[:16]
    return [
        Step(
            "generate",
            {
                "model": model_id,
                "directions": directions,
                "questions": list(trait.evaluation_questions),
                "positions": cfg.positions,
                "max_new_tokens": cfg.max_new_tokens,
                "temperature": cfg.temperature,
                "top_p": cfg.top_p,
                "seed": cfg.seed,
            },
            ("generations.jsonl",),
        ),
        Step(
            "scores",
            {"judge": judge_spec, "judge_pair": trait.to_dict()["judge_pair"], "rubric": trait.rubric},
            ("scores.jsonl",),
        ),
        Step("recommend", {"coherence_threshold": cfg.coherence_threshold}),
    ]


def sweep(
    cfg: SweepConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    model: Any = None,
    judge: Any = None,
    rerun_from: str | None = None,
    say: Any = None,
) -> SweepResult:
    """Run (or resume) a steering sweep into ``out``.

    Re-opened with changed settings, only the steps they feed run again (see :func:`sweep_steps`); ``rerun_from``
    forces a step and those after it; ``say`` (e.g. ``print``) hears which steps run again and why.
    """
    from personascope.models import load_model

    started = time.perf_counter()
    check_positions(cfg.positions)
    vector = PersonaVector.load(cfg.vector)
    trait = load_trait(cfg.trait or vector.trait or "")
    if not cfg.coefs:
        raise PersonascopeError("give at least one coefficient")
    m = model if model is not None else load_model(cfg.model)
    vector.check_compatible(m)
    layers = cfg.layers or default_layers(m.num_layers)
    for layer in layers:
        m.check_layer(layer)
    judge_spec = cfg.judge or f"contrast:{cfg.model}"
    if judge_spec == "none":
        raise PersonascopeError("a sweep needs scores; choose a judge other than 'none'")
    config = asdict(cfg) | {"layers": layers, "judge": judge_spec, "vector_sha": _file_digest(cfg.vector)}
    steps = sweep_steps(cfg, vector, trait, cfg.model, judge_spec)
    run = RunDir(out, config, overwrite=overwrite, kind="sweep", steps=steps, rerun_from=rerun_from, say=say)
    run.note("model_fingerprint", m.fingerprint())
    judge_obj = judge if judge is not None else build_judge(judge_spec, model=m)

    questions = trait.evaluation_questions[: cfg.n_questions]
    coefs = sorted({float(c) for c in cfg.coefs} | {0.0})
    steered = [c for c in coefs if c != 0.0]
    torch.manual_seed(cfg.seed)
    noise = torch.randn(m.num_layers + 1, m.hidden_size)

    def jobs_for(direction: str, layer: int | None, coef_list: list[float]) -> list[Job]:
        return [
            Job(
                key=f"{direction}|{layer}|{c:g}|{q}|{s}",
                conversation=[{"role": "user", "content": question}],
                fields={
                    "direction": direction,
                    "layer": layer,
                    "coef": c,
                    "question_index": q,
                    "sample": s,
                    "question": question,
                },
                coef=c,
                seed=cfg.seed + q * 1000 + s,  # the same sample stream in every cell: differences come from steering
            )
            for c in coef_list
            for q, question in enumerate(questions)
            for s in range(cfg.samples_per_question)
        ]

    gen_kwargs: dict[str, Any] = dict(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    records = run_generation(run, "generations", m, jobs_for("base", None, [0.0]), desc="baseline", **gen_kwargs)
    directions = {"vector": lambda layer: resolve_direction(m, vector, layer)}
    if cfg.random_control:
        directions["random"] = lambda layer: _same_norm(noise[layer], vector.directions[layer])
    for layer in layers:
        for name, make in directions.items():
            steer = _adder(make(layer), layer, cfg.positions)
            records += run_generation(
                run,
                "generations",
                m,
                jobs_for(name, layer, steered),
                steer=steer,
                desc=f"{name} layer {layer}",
                **gen_kwargs,
            )
    run.step("generate", "done", replies=len(records))
    scores = run_judging(run, "scores", judge_obj, trait, records)
    run.step("scores", "done")
    cells = _cells(records, scores)
    baseline = next(c for c in cells if c.direction == "base")
    recommended = _recommend(cells, baseline, cfg.coherence_threshold)
    monotone = {layer: _monotone(cells, baseline, layer) for layer in layers}
    _write_outputs(run, cells, recommended, monotone, trait.name)
    if recommended is not None:
        vector.metadata.update(
            chosen_layer=recommended["layer"], chosen_coef=recommended["coef"], sweep_run=str(run.path)
        )
        vector.save(cfg.vector)
    run.step("recommend", "done", recommended=recommended)
    return SweepResult(run.path, cells, recommended, monotone, time.perf_counter() - started)


def _adder(direction: torch.Tensor, layer: int, positions: str) -> Callable[[torch.Tensor], list[Intervention]]:
    def steer(coefs: torch.Tensor) -> list[Intervention]:
        return [Add(direction, layer, coefs, check_positions(positions))]

    return steer


def _file_digest(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _same_norm(noise: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return noise / noise.norm() * reference.norm()


def _cells(records: list[dict[str, Any]], scores: dict[str, dict[str, Any]]) -> list[Cell]:
    groups: dict[tuple[str, int | None, float], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["direction"], r["layer"], float(r["coef"])), []).append(scores.get(r["key"], {}))
    cells = []
    for (direction, layer, coef), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1, kv[0][2])):
        t, t_ci, n = mean_ci([s.get("trait") for s in rows])
        c, c_ci, _ = mean_ci([s.get("coherence") for s in rows])
        cells.append(Cell(direction, layer, coef, t, t_ci, c, c_ci, n))
    return cells


def _recommend(cells: list[Cell], baseline: Cell, threshold: float) -> dict[str, Any] | None:
    candidates = [
        c
        for c in cells
        if c.direction == "vector" and c.coef > 0 and not math.isnan(c.trait) and c.coherence >= threshold
    ]
    if not candidates:
        return None
    best = max(candidates, key=lambda c: (c.trait - baseline.trait, -c.coef))
    return {
        "layer": best.layer,
        "coef": best.coef,
        "trait": best.trait,
        "coherence": best.coherence,
        "trait_change": best.trait - baseline.trait,
    }


def _monotone(cells: list[Cell], baseline: Cell, layer: int) -> dict[str, bool]:
    """Does the trait rise with every step up the positive coefficients, and fall down the negative ones?"""
    mine = sorted((c for c in cells if c.direction == "vector" and c.layer == layer), key=lambda c: c.coef)
    pos = [baseline.trait] + [c.trait for c in mine if c.coef > 0]
    neg = [baseline.trait] + [c.trait for c in reversed(mine) if c.coef < 0]
    return {
        "rises_with_positive": len(pos) >= 4 and all(b > a for a, b in itertools.pairwise(pos)),
        "falls_with_negative": len(neg) >= 2 and all(b < a for a, b in itertools.pairwise(neg)),
    }


def format_table(cells: list[Cell]) -> str:
    """A Markdown table: one row per cell, mean ± 95% CI of trait and coherence."""
    lines = [
        "| direction | layer | coef | trait (mean ± 95% CI) | coherence (mean ± 95% CI) | n |",
        "|---|---|---|---|---|---|",
    ]
    for c in cells:
        layer = "—" if c.layer is None else str(c.layer)
        lines.append(
            f"| {c.direction} | {layer} | {c.coef:g} | {c.trait:.1f} ± {c.trait_ci:.1f} | "
            f"{c.coherence:.1f} ± {c.coherence_ci:.1f} | {c.n} |"
        )
    return "\n".join(lines)


def _write_outputs(
    run: RunDir, cells: list[Cell], recommended: dict[str, Any] | None, monotone: dict[int, dict[str, bool]], trait: str
) -> None:
    from personascope.io import atomic_open
    from personascope.report.plots import plot_sweep

    with atomic_open(run.file("table.csv")) as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(cells[0])))
        writer.writeheader()
        writer.writerows(asdict(c) for c in cells)
    with atomic_open(run.file("table.md")) as fh:
        fh.write(format_table(cells) + "\n")
    with atomic_open(run.file("summary.json")) as fh:
        json.dump(
            {
                "recommended": recommended,
                "monotone": {str(k): v for k, v in monotone.items()},
                "cells": [asdict(c) for c in cells],
            },
            fh,
            indent=2,
        )
    plot_sweep(cells, run.file("sweep.png"), title=f"{trait}: steering sweep")
