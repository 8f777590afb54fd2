"""Measuring a finetune: the activation shift along a persona vector, trait expression with and without post-hoc
steering, and capability on the shipped multiple-choice set.

- :func:`finetune_shift` — the paper's *finetuning shift*: the mean activation at the last prompt token over the
  evaluation questions, finetuned minus base, projected on the unit persona direction, per layer. (Projection is
  linear, so this is also the mean shift of the projections.) A positive shift predicts more trait expression.
- :func:`mcq_accuracy` — each question shown with options ``A.``–``D.``; the model's answer is the letter with the
  highest next-token probability at the start of its reply (the log-sum-exp over the letter's single-token forms,
  ``"A"`` and ``" A"``), scored with :func:`personascope.likelihood.next_token_logprobs`. Interventions active
  around the call (post-hoc steering) act on the prompt positions.
- :func:`evaluate_finetune` — a resumable run: replies of the base model and of the finetuned model to the trait's
  evaluation questions, the finetuned one also under post-hoc steering (``coef · v`` *subtracted* at inference, for
  every ``coef`` of the sweep), all judged for trait and coherence by any judge; MCQ accuracy for the same cells.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personascope.errors import PersonascopeError
from personascope.models.chat import Conversation
from personascope.residual.capture import capture
from personascope.residual.interventions import Intervention, intervene
from personascope.residual.positions import check_positions
from personascope.residual.steering import Steering

if TYPE_CHECKING:
    from personascope.models.loading import Model
    from personascope.vectors import PersonaVector

__all__ = [
    "LETTERS",
    "EvaluateConfig",
    "EvaluateResult",
    "McqResult",
    "ShiftResult",
    "evaluate_finetune",
    "finetune_shift",
    "load_mcq",
    "mcq_accuracy",
    "mcq_prompt",
    "write_shift",
]

LETTERS = ("A", "B", "C", "D")


# ------------------------------------------------------------------------------------------------ the shift


@dataclass
class ShiftResult:
    """Per layer (``layers[k]``): the projection of the mean last-prompt-token shift (finetuned − base) on the unit
    persona direction, the two models' mean projections, the shift's norm and its cosine with the direction."""

    layers: list[int]
    shift: list[float]
    base_projection: list[float]
    tuned_projection: list[float]
    shift_norm: list[float]
    cosine: list[float]
    n_questions: int
    chosen_layer: int | None = None

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "layer": layer,
                "shift": self.shift[k],
                "base_projection": self.base_projection[k],
                "tuned_projection": self.tuned_projection[k],
                "shift_norm": self.shift_norm[k],
                "cosine": self.cosine[k],
            }
            for k, layer in enumerate(self.layers)
        ]

    def at(self, layer: int) -> float:
        return self.shift[self.layers.index(layer)]


def _as_prompts(questions: Sequence[str | Conversation]) -> list[list[dict[str, str]]]:
    out = []
    for q in questions:
        if isinstance(q, str):
            out.append([{"role": "user", "content": q}])
        else:
            out.append([dict(m) for m in q])
    if not out:
        raise PersonascopeError("no evaluation questions")
    return out


def shift_questions(trait: str | None, n: int | None = None, file: str | Path | None = None) -> list[str]:
    """The questions a finetuning shift is measured on: those of ``file`` (.jsonl or .txt), else the trait's
    evaluation questions; the first ``n`` of them when ``n`` is given."""
    from personascope.finetune.datasets import load_question_pool
    from personascope.traits import load_trait

    if file is not None:
        qs = [str(r["question"]) for r in load_question_pool(file)]
    else:
        if not trait:
            raise PersonascopeError("the vector names no trait; pass --trait or --questions-file")
        qs = list(load_trait(trait).evaluation_questions)
    if n is not None and n < 1:
        raise PersonascopeError(f"--questions must be at least 1, got {n}")
    return qs[:n] if n is not None else qs


def finetune_shift(
    base: Model,
    tuned: Model,
    vector: PersonaVector,
    questions: Sequence[str | Conversation],
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool | None = None,
) -> ShiftResult:
    """The finetuning shift along ``vector`` at every layer in ``layers`` (default: all; see the module docstring)."""
    vector.check_compatible(base)
    vector.check_compatible(tuned)
    prompts = _as_prompts(questions)
    layer_list = list(layers) if layers is not None else list(range(base.num_layers + 1))
    acts = {
        name: capture(
            m, prompts, reductions=["prompt_last"], layers=layer_list, batch_size=batch_size, progress=progress
        )["prompt_last"].mean(0)
        for name, m in (("base", base), ("tuned", tuned))
    }
    diff = acts["tuned"] - acts["base"]
    units = torch.stack([vector.unit(layer) for layer in layer_list])
    shift = (diff * units).sum(-1)
    norms = diff.norm(dim=-1)
    cosine = torch.where(norms > 0, shift / norms.clamp_min(1e-12), torch.zeros_like(shift))
    return ShiftResult(
        layers=layer_list,
        shift=shift.tolist(),
        base_projection=(acts["base"] * units).sum(-1).tolist(),
        tuned_projection=(acts["tuned"] * units).sum(-1).tolist(),
        shift_norm=norms.tolist(),
        cosine=cosine.tolist(),
        n_questions=len(prompts),
        chosen_layer=vector.chosen_layer,
    )


def write_shift(result: ShiftResult, path: str | Path) -> Path:
    """The per-layer rows as ``.csv``, or everything as ``.json``, written atomically."""
    from personascope.io import atomic_open

    target = Path(path)
    if target.suffix not in (".csv", ".json"):
        raise PersonascopeError(f"--out must end in .csv or .json, got '{target.name}'")
    with atomic_open(target) as fh:
        if target.suffix == ".csv":
            writer = csv.DictWriter(fh, fieldnames=list(result.rows()[0]))
            writer.writeheader()
            writer.writerows(result.rows())
        else:
            json.dump(asdict(result), fh, indent=2)
    return target


# ------------------------------------------------------------------------------------------------ multiple choice


def load_mcq(path: str | Path | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """The multiple-choice items (the shipped ``data/mcq.jsonl`` by default), validated."""
    from personascope.io import read_jsonl

    source = (
        Path(path) if path is not None else Path(str(resources.files("personascope.finetune") / "data" / "mcq.jsonl"))
    )
    items = []
    for number, obj in read_jsonl(source):
        ok = (
            isinstance(obj, dict)
            and isinstance(obj.get("question"), str)
            and isinstance(obj.get("choices"), list)
            and len(obj["choices"]) == len(LETTERS)
            and all(isinstance(c, str) for c in obj["choices"])
            and isinstance(obj.get("answer"), int)
            and 0 <= obj["answer"] < len(LETTERS)
        )
        if not ok:
            raise PersonascopeError(
                f'{source}:{number}: expected {{"question", "choices": [4 strings], "answer": 0-3}}'
            )
        items.append(obj)
    return items[:limit] if limit is not None else items


def mcq_prompt(item: dict[str, Any]) -> list[dict[str, str]]:
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, item["choices"], strict=True))
    text = f"{item['question']}\n\n{options}\n\nAnswer with the letter of the correct option only."
    return [{"role": "user", "content": text}]


def _letter_ids(model: Model) -> list[list[int]]:
    out = []
    for letter in LETTERS:
        ids = sorted(
            {
                enc[0]
                for form in (letter, f" {letter}")
                if len(enc := model.tokenizer.encode(form, add_special_tokens=False)) == 1
            }
        )
        if not ids:
            raise PersonascopeError(f"{model.name}'s tokenizer has no single token for the option letter {letter}")
        out.append(ids)
    return out


@dataclass
class McqResult:
    accuracy: float
    n: int
    by_subject: dict[str, float]
    predictions: list[int]
    letter_mass: float  # mean probability the model puts on the option letters


@torch.no_grad()
def mcq_accuracy(
    model: Model,
    items: Sequence[dict[str, Any]] | None = None,
    *,
    interventions: Sequence[Intervention] = (),
    batch_size: int = 16,
    progress: bool | None = None,
) -> McqResult:
    """Accuracy on the multiple-choice items, scored by the next-token likelihood of the option letters."""
    from personascope.likelihood import next_token_logprobs

    rows = list(items) if items is not None else load_mcq()
    if not rows:
        raise PersonascopeError("no multiple-choice items")
    letter_ids = _letter_ids(model)
    ctx = intervene(model, interventions) if interventions else nullcontext()
    with ctx:
        logprobs = next_token_logprobs(model, [mcq_prompt(r) for r in rows], batch_size=batch_size, progress=progress)
    scores = torch.stack([logprobs[:, ids].logsumexp(-1) for ids in letter_ids], dim=-1)
    predictions = scores.argmax(-1).tolist()
    correct = [int(p == r["answer"]) for p, r in zip(predictions, rows, strict=True)]
    subjects: dict[str, list[int]] = {}
    for r, c in zip(rows, correct, strict=True):
        subjects.setdefault(str(r.get("subject", "all")), []).append(c)
    return McqResult(
        accuracy=sum(correct) / len(correct),
        n=len(correct),
        by_subject={s: sum(v) / len(v) for s, v in sorted(subjects.items())},
        predictions=predictions,
        letter_mass=float(scores.exp().sum(-1).mean()),
    )


# ------------------------------------------------------------------------------------------------ the evaluation run


@dataclass
class EvaluateConfig:
    """What :func:`evaluate_finetune` measures. ``coefs`` are post-hoc steering strengths: ``coef · v[layer]`` is
    *subtracted* from the finetuned model's residual stream at inference (0 = the finetuned model as is)."""

    finetune: str
    vector: str
    model: str | None = None  # base model; default: the one recorded in the finetune's manifest
    judge: str | None = None  # default: contrast judge on the base model
    trait: str | None = None  # default: the vector's trait
    layer: int | None = None  # default: the vector's chosen layer
    coefs: list[float] = field(default_factory=lambda: [0.0, 2.0, 4.0])
    positions: str = "all"
    n_questions: int = 10
    samples_per_question: int = 1
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16
    mcq: bool = True
    mcq_limit: int | None = None


@dataclass
class EvalCell:
    model: str  # "base" or "finetuned"
    coef: float  # post-hoc steering strength (subtracted)
    trait: float
    trait_ci: float
    coherence: float
    coherence_ci: float
    n: int
    mcq_accuracy: float | None


@dataclass
class EvaluateResult:
    run_dir: Path
    cells: list[EvalCell]
    layer: int
    seconds: float


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def evaluate_finetune(
    cfg: EvaluateConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    base: Model | None = None,
    tuned: Model | None = None,
    judge: Any = None,
) -> EvaluateResult:
    """Run (or resume) the evaluation of a finetune into ``out`` (see the module docstring).

    ``base``/``tuned`` may be passed pre-loaded (``tuned`` must then be the finetune of ``base``); ``judge`` a
    judge object.
    """
    from personascope.finetune.train import load_finetuned, read_finetune_manifest
    from personascope.models.loading import load_model
    from personascope.pipelines.common import Job, build_judge, run_generation, run_judging
    from personascope.report.stats import mean_ci
    from personascope.runs import RunDir
    from personascope.traits import load_trait
    from personascope.vectors import PersonaVector

    started = time.perf_counter()
    check_positions(cfg.positions)
    if not cfg.coefs:
        raise PersonascopeError("give at least one post-hoc steering coefficient (0 = none)")
    if cfg.n_questions < 1 or cfg.samples_per_question < 1:
        raise PersonascopeError("questions and samples per question must be at least 1")
    manifest = read_finetune_manifest(cfg.finetune)
    vector = PersonaVector.load(cfg.vector)
    trait = load_trait(cfg.trait or vector.trait or "")
    base_model = base if base is not None else load_model(cfg.model or manifest["base_model"])
    # post-hoc steering subtracts c·v for each of cfg.coefs: the policy resolves the layer, the unit is coef 1
    unit = Steering.from_vector(base_model, vector, cfg.layer, 1.0, cfg.positions, source=str(cfg.vector))
    layer = unit.layer
    tuned_model = tuned if tuned is not None else load_finetuned(base_model, cfg.finetune)
    judge_spec = cfg.judge or f"contrast:{cfg.model or manifest['base_model']}"
    coefs = sorted({float(c) for c in cfg.coefs} | {0.0})
    config = asdict(cfg) | {
        "coefs": coefs,
        "layer": layer,
        "judge": judge_spec,
        "finetune_digest": _file_digest(Path(manifest["path"]) / "personascope.json"),
        "vector_sha256": _file_digest(Path(cfg.vector)),
    }
    run = RunDir(out, config, overwrite=overwrite, kind="evaluate")
    run.note("model_fingerprint", base_model.fingerprint())
    judge_obj = judge if judge is not None else build_judge(judge_spec, model=base_model)
    questions = trait.evaluation_questions[: cfg.n_questions]

    def jobs(who: str, coef_list: list[float]) -> list[Job]:
        return [
            Job(
                key=f"{who}|{c:g}|{q}|{s}",
                conversation=[{"role": "user", "content": question}],
                fields={"model": who, "coef": c, "question_index": q, "sample": s, "question": question},
                coef=-c,
                seed=cfg.seed + q * 1000 + s,
            )
            for c in coef_list
            for q, question in enumerate(questions)
            for s in range(cfg.samples_per_question)
        ]

    def steer(coef_rows: torch.Tensor) -> list[Intervention]:
        return unit.with_coef(coef_rows).interventions()

    gen_kwargs: dict[str, Any] = dict(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
    )
    records = run_generation(run, "generations", base_model, jobs("base", [0.0]), desc="base replies", **gen_kwargs)
    records += run_generation(
        run, "generations", tuned_model, jobs("finetuned", coefs), steer=steer, desc="finetuned replies", **gen_kwargs
    )
    scores = run_judging(run, "scores", judge_obj, trait, records)

    mcq: dict[str, float] = {}
    if cfg.mcq:
        items = load_mcq(limit=cfg.mcq_limit)
        done = {r["key"]: float(r["accuracy"]) for r in run.records("mcq")}
        cells_todo: list[tuple[str, Model, float]] = [("base", base_model, 0.0)]
        cells_todo += [("finetuned", tuned_model, c) for c in coefs]
        for who, m, c in cells_todo:
            key = f"{who}|{c:g}"
            if key not in done:
                adders = unit.with_coef(-c).interventions() if who == "finetuned" else []
                res = mcq_accuracy(m, items, interventions=adders, batch_size=cfg.batch_size, progress=False)
                run.append("mcq", [{"key": key, "accuracy": res.accuracy, "n": res.n, "by_subject": res.by_subject}])
                done[key] = res.accuracy
        mcq = done

    cells = []
    for who, c in [("base", 0.0)] + [("finetuned", c) for c in coefs]:
        mine = [scores.get(r["key"], {}) for r in records if r["model"] == who and float(r["coef"]) == c]
        t, t_ci, n = mean_ci([s.get("trait") for s in mine])
        h, h_ci, _ = mean_ci([s.get("coherence") for s in mine])
        cells.append(EvalCell(who, c, t, t_ci, h, h_ci, n, mcq.get(f"{who}|{c:g}")))
    _write_eval(run, cells)
    run.step("evaluate", "done", cells=[asdict(c) for c in cells])
    return EvaluateResult(run.path, cells, layer, time.perf_counter() - started)


def format_eval_table(cells: Sequence[EvalCell]) -> str:
    """A Markdown table: one row per model and post-hoc coefficient."""

    def fmt(value: float, ci: float) -> str:
        if math.isnan(value):
            return "n/a"
        return f"{value:.1f}" + ("" if math.isnan(ci) else f" ± {ci:.1f}")

    lines = [
        "| model | post-hoc coef (subtracted) | trait | coherence | n | MCQ accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for c in cells:
        acc = "—" if c.mcq_accuracy is None else f"{c.mcq_accuracy:.3f}"
        lines.append(
            f"| {c.model} | {c.coef:g} | {fmt(c.trait, c.trait_ci)} | {fmt(c.coherence, c.coherence_ci)} | {c.n} | "
            f"{acc} |"
        )
    return "\n".join(lines)


def _write_eval(run: Any, cells: list[EvalCell]) -> None:
    from personascope.io import atomic_open

    with atomic_open(run.file("table.csv")) as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(cells[0])))
        writer.writeheader()
        writer.writerows(asdict(c) for c in cells)
    with atomic_open(run.file("table.md")) as fh:
        fh.write(format_eval_table(cells) + "\n")
    with atomic_open(run.file("summary.json")) as fh:
        json.dump({"cells": [asdict(c) for c in cells]}, fh, indent=2)
