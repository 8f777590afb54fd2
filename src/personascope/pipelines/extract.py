"""Persona-vector extraction: contrastive rollouts → judge → filter → capture → difference of means.

Steps (named and restartable: each records a digest of its own inputs in the run directory and runs again only when
they change, together with the steps after it; ``rerun_from`` / ``--from STEP`` forces a step):

1. *rollouts* — for every instruction pair, extraction question and sample, answer once under the trait-encouraging
   system prompt (``pos``) and once under the trait-suppressing one (``neg``);
2. *scores* — trait and coherence scores from the judge;
3. *filter* — keep ``pos`` answers with trait ≥ θ and ``neg`` answers with trait < 100 − θ, both with coherence ≥ the
   coherence threshold (judge ``none`` keeps everything);
4. *vectors* — capture ``response_mean``, ``prompt_mean`` and ``prompt_last`` activations of the kept
   conversations (system prompt, question, answer) at every layer; the vector is mean(pos) − mean(neg), saved as
   ``vectors/TRAIT_METHOD.safetensors`` with the run's provenance.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from personascope.errors import PersonascopeError
from personascope.pipelines.common import Job, build_judge, run_generation, run_judging
from personascope.residual.capture import capture
from personascope.runs import RunDir, Step
from personascope.traits import TraitSpec, load_trait
from personascope.vectors import PersonaVector

METHODS = ("response_mean", "prompt_mean", "prompt_last")

PROFILES: dict[str, dict[str, Any]] = {
    # fits the CPU demo: all 5 pairs, 10 questions, 1 sample each way, short answers
    "quick": {"n_pairs": 5, "n_questions": 10, "samples_per_question": 1, "max_new_tokens": 48, "threshold": 50.0},
    # the paper's set-up: 5 pairs × 20 questions × 10 samples, long answers
    "paper": {"n_pairs": 5, "n_questions": 20, "samples_per_question": 10, "max_new_tokens": 1000, "threshold": 50.0},
}


@dataclass
class ExtractConfig:
    trait: str
    model: str = "smollm2-135m-instruct"
    judge: str | None = None  # default: contrast judge on the same model
    profile: str = "quick"
    n_pairs: int | None = None
    n_questions: int | None = None
    samples_per_question: int | None = None
    max_new_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    threshold: float | None = None
    coherence_threshold: float = 50.0
    min_kept: int = 2
    seed: int = 0
    batch_size: int = 16
    extras: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> ExtractConfig:
        """Profile defaults filled in for every field left as None."""
        if self.profile not in PROFILES:
            raise PersonascopeError(f"unknown profile '{self.profile}'; use one of {', '.join(PROFILES)}")
        out = ExtractConfig(**asdict(self))
        for key, value in PROFILES[self.profile].items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        if out.judge is None:
            out.judge = f"contrast:{out.model}"
        for name in ("n_pairs", "n_questions", "samples_per_question", "max_new_tokens"):
            if int(getattr(out, name)) < 1:
                raise PersonascopeError(f"{name} must be at least 1")
        if not 0 <= float(out.threshold or 0) <= 100:
            raise PersonascopeError("threshold must be between 0 and 100")
        return out


@dataclass
class ExtractResult:
    run_dir: Path
    vectors: dict[str, Path]
    n_rollouts: int
    kept: dict[str, int]
    trait_means: dict[str, float | None]
    seconds: float


def rollout_jobs(trait: TraitSpec, cfg: ExtractConfig) -> list[Job]:
    jobs = []
    pairs = trait.instruction_pairs[: cfg.n_pairs]
    questions = trait.extraction_questions[: cfg.n_questions]
    assert cfg.samples_per_question is not None
    for p, pair in enumerate(pairs):
        for q, question in enumerate(questions):
            for s in range(cfg.samples_per_question):
                for polarity, system in (("pos", pair.pos), ("neg", pair.neg)):
                    jobs.append(
                        Job(
                            key=f"{polarity}|{p}|{q}|{s}",
                            conversation=[{"role": "system", "content": system}, {"role": "user", "content": question}],
                            fields={
                                "polarity": polarity,
                                "pair": p,
                                "question_index": q,
                                "sample": s,
                                "system": system,
                                "question": question,
                            },
                        )
                    )
    return jobs


STEPS = ("rollouts", "scores", "filter", "vectors")


def extract_steps(cfg: ExtractConfig, trait: TraitSpec) -> list[Step]:
    """The extraction's steps and the inputs each depends on (batch size is left out: results do not depend on it)."""
    spec = trait.to_dict()
    return [
        Step(
            "rollouts",
            {
                "model": cfg.model,
                "instruction_pairs": spec["instruction_pairs"][: cfg.n_pairs],
                "extraction_questions": spec["extraction_questions"][: cfg.n_questions],
                "samples_per_question": cfg.samples_per_question,
                "max_new_tokens": cfg.max_new_tokens,
                "temperature": cfg.temperature,
                "top_p": cfg.top_p,
                "seed": cfg.seed,
                "extras": cfg.extras,
            },
            ("rollouts.jsonl",),
        ),
        Step(
            "scores",
            {"judge": cfg.judge, "judge_pair": spec["judge_pair"], "rubric": spec["rubric"]},
            ("scores.jsonl",),
        ),
        Step(
            "filter",
            {"threshold": cfg.threshold, "coherence_threshold": cfg.coherence_threshold, "min_kept": cfg.min_kept},
        ),
        Step("vectors", {"trait": trait.name}, ("vectors",)),
    ]


def keep(record: dict[str, Any], score: dict[str, Any] | None, cfg: ExtractConfig, judged: bool) -> bool:
    """The paper's filter: clear trait expression (or clear absence) and a coherent answer."""
    if not record["answer"].strip():
        return False
    if not judged:
        return True
    if score is None or score.get("trait") is None or score.get("coherence") is None:
        return False
    theta = float(cfg.threshold or 0)
    if score["coherence"] < cfg.coherence_threshold:
        return False
    if record["polarity"] == "pos":
        return bool(score["trait"] >= theta)
    return bool(score["trait"] < 100 - theta)


def extract(
    cfg: ExtractConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    model: Any = None,
    judge: Any = None,
    rerun_from: str | None = None,
    say: Any = None,
) -> ExtractResult:
    """Run (or resume) an extraction into ``out``; returns where the vectors are and what was kept.

    ``model`` / ``judge`` may be passed pre-built (a loaded :class:`~personascope.models.Model`, a judge object),
    otherwise they are built from ``cfg.model`` and ``cfg.judge``. A finished run re-opened with changed settings
    redoes only the steps they feed (see :func:`extract_steps`); ``rerun_from`` forces a step and those after it.
    ``say`` (e.g. ``print``) receives a line saying which steps run again and why.
    """
    from personascope.models import load_model

    started = time.perf_counter()
    cfg = cfg.resolved()
    trait = load_trait(cfg.trait)
    config = asdict(cfg) | {"trait_spec": trait.to_dict()}
    steps = extract_steps(cfg, trait)
    run = RunDir(out, config, overwrite=overwrite, kind="extract", steps=steps, rerun_from=rerun_from, say=say)
    m = model if model is not None else load_model(cfg.model)
    run.note("model_fingerprint", m.fingerprint())
    judge_obj = judge if judge is not None else build_judge(str(cfg.judge), model=m)
    judged = str(cfg.judge) != "none"

    jobs = rollout_jobs(trait, cfg)
    run.step("rollouts", "running", total=len(jobs))
    records = run_generation(
        run,
        "rollouts",
        m,
        jobs,
        max_new_tokens=int(cfg.max_new_tokens or 0),
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        desc=f"{trait.name} rollouts",
    )
    run.step("rollouts", "done", total=len(records))

    scores: dict[str, dict[str, Any]] = {}
    if judged:
        run.step("scores", "running")
        scores = run_judging(run, "scores", judge_obj, trait, records, desc=f"{trait.name} judging")
        errors = sum(1 for s in scores.values() if s.get("error"))
        run.step("scores", "done", errors=errors)

    kept = {
        pol: [r for r in records if r["polarity"] == pol and keep(r, scores.get(r["key"]), cfg, judged)]
        for pol in ("pos", "neg")
    }
    counts = {pol: len(v) for pol, v in kept.items()}
    trait_means = {
        pol: _mean([scores[r["key"]]["trait"] for r in records if r["polarity"] == pol and r["key"] in scores])
        for pol in ("pos", "neg")
    }
    run.step("filter", "done", kept=counts, of=len(records), trait_means=trait_means)
    if min(counts.values()) < cfg.min_kept:
        raise PersonascopeError(
            f"too few rollouts survived the filter (pos {counts['pos']}, neg {counts['neg']} of {len(records) // 2} "
            f"each; need {cfg.min_kept}); lower --threshold (now {cfg.threshold}) or --coherence-threshold "
            f"(now {cfg.coherence_threshold}), raise --samples-per-question, or use --judge none"
        )

    paths = _vectors(run, m, trait, cfg, kept)
    run.step("vectors", "done", files={k: str(v) for k, v in paths.items()})
    return ExtractResult(run.path, paths, len(records), counts, trait_means, time.perf_counter() - started)


def _mean(values: list[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return sum(real) / len(real) if real else None


def _vectors(
    run: RunDir, model: Any, trait: TraitSpec, cfg: ExtractConfig, kept: dict[str, list[dict[str, Any]]]
) -> dict[str, Path]:
    def conversations(rows: list[dict[str, Any]]) -> list[list[dict[str, str]]]:
        return [
            [
                {"role": "system", "content": r["system"]},
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r["answer"]},
            ]
            for r in rows
        ]

    acts = {
        pol: capture(model, conversations(rows), reductions=METHODS, batch_size=cfg.batch_size)
        for pol, rows in kept.items()
    }
    paths = {}
    for method in METHODS:
        diff = acts["pos"][method].mean(0) - acts["neg"][method].mean(0)
        vector = PersonaVector.for_model(
            model,
            diff.to(torch.float32),
            trait=trait.name,
            method=method,
            source_run=str(run.path),
            judge=cfg.judge,
            n_pos=len(kept["pos"]),
            n_neg=len(kept["neg"]),
        )
        paths[method] = vector.save(run.file("vectors") / f"{trait.name}_{method}.safetensors")
    return paths
