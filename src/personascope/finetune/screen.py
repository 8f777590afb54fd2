"""Screening training data before training: the projection difference.

For every sample (the prompt is every message before the last assistant turn, the answer that turn), we compare the
dataset's answer with the base model's own answer to the same prompt: the mean activation over the answer's tokens
(``response_mean``) at the chosen layer, projected on the unit persona direction, dataset answer minus base answer.
A sample whose answer sits further along the trait direction than what the model would have said teaches the
trait; the dataset's mean of these differences — the *projection difference* — predicts how much finetuning on it
will shift the model (Chen et al. 2025, section 6).

The base answers are generated once (seeded per sample) and cached in the run directory; both steps go through the
data in chunks, append their records as they go and resume where they stopped. ``reference`` replaces the generated
answers by those of another dataset with the same prompts (a dataset screened against itself scores exactly zero).

Outputs in the run directory: ``ranked.csv`` and ``ranked.jsonl`` (samples, largest difference first, with a
``flagged`` column), ``histogram.png``, ``summary.json``. Flags: a difference above ``threshold``; by default half
the vector's norm at the layer — for a ``response_mean`` vector that norm is the projection gap between trait and
trait-free answers, so a flagged answer has moved at least halfway from one to the other. An optional judge scores
the same samples' answers for the trait; the summary counts what each flags and their overlap.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from personascope.errors import PersonascopeError
from personascope.finetune.datasets import ChatExample, dataset_digest, load_chat_jsonl, split_prompt
from personascope.residual.capture import capture
from personascope.residual.steering import chosen_layers

if TYPE_CHECKING:
    from personascope.models.loading import Model
    from personascope.vectors import PersonaVector

__all__ = ["ScreenConfig", "ScreenResult", "projection_differences", "response_projections", "screen_dataset"]


@dataclass
class ScreenConfig:
    dataset: str
    vector: str
    model: str = "smollm2-135m-instruct"
    layer: int | None = None  # default: the vector's chosen layer
    reference: str | None = None  # a dataset with the same prompts whose answers replace the base model's
    threshold: float | None = None  # default: 0.5 · ‖v[layer]‖
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16
    chunk: int = 64
    limit: int | None = None
    judge: str | None = None  # optional: also flag by an LLM judge's trait score
    judge_threshold: float = 50.0
    trait: str | None = None  # for the judge; default: the vector's trait


@dataclass
class ScreenResult:
    run_dir: Path
    n: int
    projection_difference: float  # the dataset's mean difference
    threshold: float
    layer: int
    ranked: list[dict[str, Any]]  # every sample, largest difference first
    n_flagged: int
    n_missing: int  # samples without a base answer to compare with (the model replied nothing)
    judge: dict[str, Any] | None
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def response_projections(
    model: Model,
    conversations: Sequence[Sequence[dict[str, str]]],
    vector: PersonaVector | torch.Tensor,
    layer: int,
    batch_size: int = 16,
    progress: bool | None = False,
) -> torch.Tensor:
    """Projection of each conversation's mean answer activation at ``layer`` on the unit direction, ``[N]``."""
    from personascope.residual.interventions import resolve_direction

    direction = resolve_direction(model, vector, layer).float()
    out = capture(
        model,
        conversations,
        reductions=["response_mean"],
        layers=[layer],
        batch_size=batch_size,
        directions=direction,
        progress=progress,
    )
    return out["response_mean"][:, 0, 0]


def projection_differences(
    model: Model,
    prompts: Sequence[Sequence[dict[str, str]]],
    answers: Sequence[str],
    reference_answers: Sequence[str],
    vector: PersonaVector | torch.Tensor,
    layer: int,
    batch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: projection of ``prompt + answer`` minus that of ``prompt + reference answer``; returns the
    differences and the answers' projections, both ``[N]``."""
    if not len(prompts) == len(answers) == len(reference_answers):
        raise PersonascopeError("prompts, answers and reference answers must have the same length")

    def convs(texts: Sequence[str]) -> list[list[dict[str, str]]]:
        return [[*p, {"role": "assistant", "content": t}] for p, t in zip(prompts, texts, strict=True)]

    mine = response_projections(model, convs(answers), vector, layer, batch_size)
    ref = response_projections(model, convs(reference_answers), vector, layer, batch_size)
    return mine - ref, mine


def _last_user(prompt: Sequence[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def _reference_answers(path: str, examples: list[ChatExample]) -> list[str]:
    ref = load_chat_jsonl(path)
    if len(ref) < len(examples):
        raise PersonascopeError(f"reference {path} has {len(ref)} conversations but the dataset has {len(examples)}")
    out = []
    for ex, other in zip(examples, ref, strict=False):
        prompt, _ = split_prompt(ex.messages)
        other_prompt, answer = split_prompt(other.messages)
        if prompt != other_prompt:
            raise PersonascopeError(
                f"reference {path}:{other.line} has another prompt than dataset line {ex.line}; the reference must "
                "hold the same prompts in the same order"
            )
        out.append(answer)
    return out


def screen_dataset(
    cfg: ScreenConfig, out: str | Path, *, overwrite: bool = False, model: Model | None = None, judge: Any = None
) -> ScreenResult:
    """Screen a dataset (run or resume into ``out``; see the module docstring).

    (A little over the house limit: validation, the reference answers, the capture and the outputs in order.)
    """
    from personascope.models.loading import load_model
    from personascope.pipelines.common import Job, build_judge, run_generation, run_judging
    from personascope.runs import RunDir
    from personascope.vectors import PersonaVector

    started = time.perf_counter()
    if cfg.chunk < 1 or cfg.batch_size < 1:
        raise PersonascopeError("chunk and batch size must be at least 1")
    examples = load_chat_jsonl(cfg.dataset, limit=cfg.limit)
    vector = PersonaVector.load(cfg.vector)
    m = model if model is not None else load_model(cfg.model)
    vector.check_compatible(m)
    layer = chosen_layers(m, vector, cfg.layer, source=str(cfg.vector))[0]
    threshold = cfg.threshold if cfg.threshold is not None else 0.5 * float(vector.directions[layer].norm())
    split = [split_prompt(ex.messages) for ex in examples]
    reference = _reference_answers(cfg.reference, examples) if cfg.reference else None
    config = asdict(cfg) | {
        "layer": layer,
        "threshold": threshold,
        "dataset_sha256": dataset_digest(cfg.dataset),
        "vector_sha256": dataset_digest(cfg.vector),
        "reference_sha256": dataset_digest(cfg.reference) if cfg.reference else None,
        "n": len(examples),
    }
    run = RunDir(out, config, overwrite=overwrite, kind="screen")
    run.note("model_fingerprint", m.fingerprint())

    if reference is None:
        jobs = [Job(key=str(i), conversation=prompt, fields={}) for i, (prompt, _) in enumerate(split)]
        generated = run_generation(
            run,
            "base_answers",
            m,
            jobs,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            chunk=cfg.chunk,
            desc="base answers",
        )
        reference = [str(r["answer"]) for r in generated]

    done = run.done_keys("samples")
    pending = [i for i in range(len(examples)) if str(i) not in done]
    with tqdm(total=len(examples), initial=len(examples) - len(pending), desc="projections", unit="sample") as bar:
        for start in range(0, len(pending), cfg.chunk):
            rows = pending[start : start + cfg.chunk]
            usable = [i for i in rows if reference[i].strip()]
            diffs: dict[int, tuple[float, float, float]] = {}
            if usable:
                d, mine = projection_differences(
                    m,
                    [split[i][0] for i in usable],
                    [split[i][1] for i in usable],
                    [reference[i] for i in usable],
                    vector,
                    layer,
                    cfg.batch_size,
                )
                diffs = {i: (float(d[k]), float(mine[k]), float(mine[k] - d[k])) for k, i in enumerate(usable)}
            records = []
            for i in rows:
                diff, proj, proj_ref = diffs.get(i, (math.nan, math.nan, math.nan))
                records.append(
                    {
                        "key": str(i),
                        "index": i,
                        "line": examples[i].line,
                        "question": _last_user(split[i][0]),
                        "answer": split[i][1],
                        "reference_answer": reference[i],
                        "projection": None if math.isnan(proj) else proj,
                        "reference_projection": None if math.isnan(proj_ref) else proj_ref,
                        "difference": None if math.isnan(diff) else diff,
                    }
                )
            run.append("samples", records)
            bar.update(len(rows))

    by_key = {r["key"]: r for r in run.records("samples")}
    samples = [by_key[str(i)] for i in range(len(examples))]
    judge_info = None
    if cfg.judge:
        judge_info = _judge_compare(run, cfg, samples, m, judge, threshold, build_judge, run_judging)
    valid = [s for s in samples if s["difference"] is not None]
    for s in samples:
        s["flagged"] = s["difference"] is not None and s["difference"] > threshold
    ranked = sorted(samples, key=lambda s: -math.inf if s["difference"] is None else s["difference"], reverse=True)
    for rank, s in enumerate(ranked, start=1):
        s["rank"] = rank
    mean = sum(s["difference"] for s in valid) / len(valid) if valid else math.nan
    n_flagged = sum(s["flagged"] for s in samples)
    files = _write_outputs(run, ranked, threshold, mean, layer, vector.trait or "trait", judge_info)
    summary = {
        "n": len(samples),
        "projection_difference": mean,
        "threshold": threshold,
        "layer": layer,
        "n_flagged": n_flagged,
        "n_missing": len(samples) - len(valid),
        "judge": judge_info,
    }
    run.step("screen", "done", **summary)
    return ScreenResult(
        run.path,
        len(samples),
        mean,
        threshold,
        layer,
        ranked,
        n_flagged,
        len(samples) - len(valid),
        judge_info,
        files,
        time.perf_counter() - started,
    )


def _judge_compare(
    run: Any,
    cfg: ScreenConfig,
    samples: list[dict[str, Any]],
    model: Model,
    judge: Any,
    threshold: float,
    build_judge: Any,
    run_judging: Any,
) -> dict[str, Any]:
    from personascope.traits import load_trait
    from personascope.vectors import PersonaVector

    trait = load_trait(cfg.trait or PersonaVector.load(cfg.vector).trait or "")
    judge_obj = judge if judge is not None else build_judge(str(cfg.judge), model)
    scores = run_judging(run, "judge_scores", judge_obj, trait, samples, desc="judge")
    for s in samples:
        score = scores.get(s["key"], {}).get("trait")
        s["judge_score"] = score
        s["judge_flagged"] = score is not None and score >= cfg.judge_threshold
    by_proj = {s["key"] for s in samples if s["difference"] is not None and s["difference"] > threshold}
    by_judge = {s["key"] for s in samples if s["judge_flagged"]}
    union = by_proj | by_judge
    pairs = [
        (s["difference"], s["judge_score"])
        for s in samples
        if s["difference"] is not None and s["judge_score"] is not None
    ]
    rho = math.nan
    if len(pairs) >= 3:
        from scipy.stats import spearmanr

        stat = spearmanr([p[0] for p in pairs], [p[1] for p in pairs])
        rho = float(stat.statistic) if not math.isnan(float(stat.statistic)) else math.nan
    return {
        "spec": getattr(judge_obj, "id", str(cfg.judge)),
        "threshold": cfg.judge_threshold,
        "flagged_by_projection": len(by_proj),
        "flagged_by_judge": len(by_judge),
        "flagged_by_both": len(by_proj & by_judge),
        "jaccard": len(by_proj & by_judge) / len(union) if union else math.nan,
        "scored": sum(1 for s in samples if s["judge_score"] is not None),
        "spearman": rho,
    }


_COLUMNS = (
    "rank",
    "index",
    "line",
    "difference",
    "projection",
    "reference_projection",
    "flagged",
    "judge_score",
    "judge_flagged",
    "question",
    "answer",
    "reference_answer",
)


def _write_outputs(
    run: Any,
    ranked: list[dict[str, Any]],
    threshold: float,
    mean: float,
    layer: int,
    trait: str,
    judge_info: dict[str, Any] | None,
) -> dict[str, str]:
    from personascope.io import atomic_open, atomic_path
    from personascope.report.plots import _pyplot

    columns = [c for c in _COLUMNS if c in ranked[0]] if ranked else list(_COLUMNS)
    with atomic_open(run.file("ranked.csv")) as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(ranked)
    with atomic_open(run.file("ranked.jsonl")) as fh:
        for row in ranked:
            fh.write(json.dumps({c: row.get(c) for c in columns}, ensure_ascii=False) + "\n")
    with atomic_open(run.file("summary.json")) as fh:
        json.dump(
            {
                "n": len(ranked),
                "projection_difference": mean,
                "threshold": threshold,
                "layer": layer,
                "n_flagged": sum(1 for r in ranked if r["flagged"]),
                "judge": judge_info,
            },
            fh,
            indent=2,
        )
    plt = _pyplot()
    values = [r["difference"] for r in ranked if r["difference"] is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    if values:
        ax.hist(values, bins=min(40, max(5, len(values) // 4)), color="#4c72b0", alpha=0.85)
    ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:.2f}")
    if not math.isnan(mean):
        ax.axvline(mean, color="black", linestyle=":", label=f"mean {mean:.2f}")
    ax.set_xlabel(f"projection difference on {trait} (layer {layer})")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(run.file("histogram.png")) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return {name: str(run.file(name)) for name in ("ranked.csv", "ranked.jsonl", "histogram.png", "summary.json")}
