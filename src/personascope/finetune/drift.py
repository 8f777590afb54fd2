"""The finetuning-drift experiment: does the shift along a persona vector, and the projection difference measured
before training, predict how much a dataset teaches a trait? And does preventative steering beat post-hoc steering?

One resumable run directory composes the finetune pieces (Chen et al. 2025, sections 5 and 6), as named steps that
each record a digest of their own inputs (:func:`drift_steps`): changing a setting redoes only the steps that use
it (a new judge re-measures without retraining; new steering coefficients redo only the comparison), and
``rerun_from`` / ``--from STEP`` forces a step and those that use it.

1. **datasets** — ``TRAIT:LEVEL`` items are built by context distillation (:func:`build_dataset`), ``arithmetic:LEVEL``
   from the shipped narrow-flaw pool; a path to a JSONL file is used as it is;
2. **finetune** — the same training config for every dataset (:func:`finetune`); one dataset (``track``) is also
   measured at every ``track_every`` optimizer steps on its way (checkpoints within a run);
3. **measure** — for every finetuned model and every vector: the finetuning shift at the vector's layer
   (:func:`finetune_shift`) and the trait and coherence scores of its replies to the trait's evaluation questions,
   against the base model's (the *trait change*);
4. **screen** — for every dataset and vector, the projection difference of the dataset's answers against the base
   model's own answers to the same prompts (:func:`screen_dataset`; the base answers are generated once per prompt
   and shared by datasets that ask the same questions);
5. **compare** — on one dataset (``compare``): plain finetune, post-hoc steering (``coef · v`` subtracted at
   inference), preventative steering (``+steer_coef · v`` added during training) and CAFT (the direction ablated
   during training): trait, coherence and multiple-choice accuracy in one table (:func:`evaluate_finetune`).

Outputs: ``points.csv`` (one row per model and trait), ``summary.json`` (Pearson r with bootstrap intervals:
shift vs trait change and projection difference vs trait change across datasets, shift vs trait change across
checkpoints), ``compare.md``, and scatter plots.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personascope.errors import PersonascopeError
from personascope.finetune.datasets import DOMAINS, LEVELS, BuildConfig, build_dataset, split_prompt
from personascope.finetune.drift_report import _is_final, _summarise, _write
from personascope.finetune.evaluate import EvalCell, EvaluateConfig, evaluate_finetune, finetune_shift
from personascope.finetune.screen import ScreenConfig, screen_dataset
from personascope.finetune.train import FinetuneConfig, finetune, total_steps
from personascope.residual.steering import chosen_layers

if TYPE_CHECKING:
    from personascope.judges import Judge
    from personascope.models.loading import Model
    from personascope.runs import RunDir, Step
    from personascope.traits import TraitSpec
    from personascope.vectors import PersonaVector

__all__ = ["DEFAULT_DATASETS", "DriftConfig", "DriftResult", "drift_experiment", "parse_dataset"]

DEFAULT_DATASETS = (
    "evil:normal",
    "evil:I",
    "evil:II",
    "impolite:normal",
    "impolite:I",
    "impolite:II",
    "arithmetic:II",
)
_FINETUNE_KEYS = {f for f in FinetuneConfig.__dataclass_fields__ if f not in ("dataset", "model", "steer", "ablate")}


@dataclass
class DriftConfig:
    """What the experiment runs. ``vectors`` are PersonaVector files (each names the trait it measures);
    ``layers`` gives each one's layer (default: the vector's chosen layer). ``finetune`` overrides fields of
    :class:`FinetuneConfig` (e.g. ``{"epochs": 2}``) for every training run."""

    vectors: list[str]
    datasets: list[str] = field(default_factory=lambda: list(DEFAULT_DATASETS))
    layers: list[int] | None = None
    model: str = "smollm2-135m-instruct"
    judge: str | None = None  # default: the contrast judge on the base model
    n: int = 200  # conversations per built dataset
    n_questions: int = 20
    samples_per_question: int = 1
    max_new_tokens: int = 48
    temperature: float = 1.0
    data_max_new_tokens: int = 64
    track: str | None = None  # a dataset also measured at checkpoints on its way
    track_every: int = 5
    compare: str | None = None  # the dataset of the steering comparison
    steer_coef: float = 4.0  # preventative steering strength during training
    posthoc_coefs: list[float] = field(default_factory=lambda: [2.0, 4.0])
    mcq_limit: int | None = None
    finetune: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    batch_size: int = 16


@dataclass
class DriftResult:
    run_dir: Path
    points: list[dict[str, Any]]
    summary: dict[str, Any]
    compare: list[dict[str, Any]]
    seconds: float


def parse_dataset(item: str) -> tuple[str, str | None, Path | None]:
    """``TRAIT:LEVEL`` / ``arithmetic:LEVEL`` → (name, level, None); an existing ``.jsonl`` path → (stem, None,
    path). Anything else is a one-line error."""
    if item.endswith(".jsonl"):
        path = Path(item)
        if not path.is_file():
            raise PersonascopeError(f"dataset file not found: {item}")
        return path.stem, None, path
    name, sep, level = item.partition(":")
    if not sep or not name or level not in LEVELS:
        raise PersonascopeError(
            f"dataset '{item}' must be TRAIT:LEVEL (LEVEL one of {', '.join(LEVELS)}), e.g. evil:II or "
            f"{DOMAINS[0]}:II, or a .jsonl file"
        )
    return f"{Path(name).stem}-{level}", level, None


def _check(cfg: DriftConfig) -> None:
    if not cfg.vectors:
        raise PersonascopeError("give at least one persona vector (--vector)")
    if not cfg.datasets:
        raise PersonascopeError("give at least one dataset")
    if cfg.layers is not None and len(cfg.layers) != len(cfg.vectors):
        raise PersonascopeError(f"give one layer per vector: {len(cfg.vectors)} vectors, {len(cfg.layers)} layers")
    for name, value in (("n", cfg.n), ("questions", cfg.n_questions), ("track-every", cfg.track_every)):
        if value < 1:
            raise PersonascopeError(f"{name} must be at least 1")
    names = [parse_dataset(d)[0] for d in cfg.datasets]
    if len(set(names)) != len(names):
        raise PersonascopeError(f"datasets repeat: {', '.join(sorted(n for n in set(names) if names.count(n) > 1))}")
    for role, item in (("track", cfg.track), ("compare", cfg.compare)):
        if item is not None and item not in cfg.datasets:
            raise PersonascopeError(f"--{role} {item} is not one of the datasets ({', '.join(cfg.datasets)})")
    unknown = sorted(set(cfg.finetune) - _FINETUNE_KEYS)
    if unknown:
        raise PersonascopeError(f"unknown finetune settings: {', '.join(unknown)}")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Measurer:
    """Replies to a trait's evaluation questions, judged, one record set per (model label, trait); cached in a run."""

    def __init__(self, run: RunDir, judge: Judge, cfg: DriftConfig):
        self.run, self.judge, self.cfg = run, judge, cfg

    def trait_scores(self, model: Model, label: str, trait: TraitSpec) -> dict[str, float]:
        from personascope.pipelines.common import Job, run_generation, run_judging
        from personascope.report.stats import mean_ci

        cfg = self.cfg
        questions = trait.evaluation_questions[: cfg.n_questions]
        jobs = [
            Job(
                key=f"{label}|{trait.name}|{q}|{s}",
                conversation=[{"role": "user", "content": question}],
                fields={"model": label, "trait": trait.name, "question": question},
                seed=cfg.seed + q * 1000 + s,
            )
            for q, question in enumerate(questions)
            for s in range(cfg.samples_per_question)
        ]
        records = run_generation(
            self.run,
            "replies",
            model,
            jobs,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=1.0,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            desc=f"{label} replies ({trait.name})",
        )
        scores = run_judging(self.run, "scores", self.judge, trait, records, desc=f"judging {label}")
        t, t_ci, n = mean_ci([scores.get(r["key"], {}).get("trait") for r in records])
        h, h_ci, _ = mean_ci([scores.get(r["key"], {}).get("coherence") for r in records])
        return {"trait_score": t, "trait_ci": t_ci, "coherence": h, "coherence_ci": h_ci, "n": n}


def _base_answers(run: RunDir, model: Model, prompts: list[list[dict[str, str]]], cfg: DriftConfig) -> list[str]:
    """The base model's own answer to each prompt, generated once per distinct prompt (seeded by its text)."""
    from personascope.pipelines.common import Job, run_generation

    keys = [_digest(json.dumps(p, sort_keys=True)) for p in prompts]
    unique = dict(zip(keys, prompts, strict=True))
    jobs = [Job(key=k, conversation=p, fields={}, seed=cfg.seed + int(k[:7], 16)) for k, p in sorted(unique.items())]
    records = run_generation(
        run,
        "base_answers",
        model,
        jobs,
        max_new_tokens=cfg.data_max_new_tokens,
        temperature=cfg.temperature,
        top_p=1.0,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        desc="base answers",
    )
    by_key = {r["key"]: str(r["answer"]) for r in records}
    return [by_key[k] for k in keys]


def drift_steps(
    cfg: DriftConfig, vectors: Sequence[tuple[str, PersonaVector, int, TraitSpec]], judge_spec: str
) -> list[Step]:
    """data → finetune → measure, data → screen, finetune → compare: each step's inputs and outputs."""
    from personascope.runs import Step

    vecs = {
        "vectors": [hashlib.sha256(v.directions.numpy().tobytes()).hexdigest()[:16] for _, v, _, _ in vectors],
        "layers": [layer for _, _, layer, _ in vectors],
    }
    scoring = {
        "judge": judge_spec,
        "n_questions": cfg.n_questions,
        "samples_per_question": cfg.samples_per_question,
        "max_new_tokens": cfg.max_new_tokens,
    }
    names = [parse_dataset(d)[0] for d in cfg.datasets]
    compared = parse_dataset(cfg.compare)[0] if cfg.compare is not None else None
    data = {k: getattr(cfg, k) for k in ("model", "datasets", "n", "data_max_new_tokens", "temperature", "seed")}
    return [
        Step("data", data, ("data",), after=()),
        Step(
            "finetune",
            {"finetune": cfg.finetune, "track": cfg.track, "track_every": cfg.track_every},
            tuple(f"finetune/{n}" for n in names),
            after=("data",),
        ),
        Step("measure", vecs | scoring, ("points.jsonl", "replies.jsonl", "scores.jsonl"), after=("finetune",)),
        Step("screen", vecs, ("screen", "base_answers.jsonl"), after=("data",)),
        Step(
            "compare",
            vecs | scoring | {k: getattr(cfg, k) for k in ("compare", "steer_coef", "posthoc_coefs", "mcq_limit")},
            ("compare", f"finetune/{compared}+steer", f"finetune/{compared}+caft") if compared else ("compare",),
            after=("finetune",),
        ),
    ]


def _datasets(cfg: DriftConfig, base: Model, root: Path) -> dict[str, Path]:
    """Step 1: build each ``TRAIT:LEVEL`` / ``arithmetic:LEVEL`` dataset (resumable) or take a given file."""
    datasets: dict[str, Path] = {}
    for item in cfg.datasets:
        name, level, given = parse_dataset(item)
        if given is None:
            trait_name = item.partition(":")[0]
            built = build_dataset(
                BuildConfig(
                    trait=trait_name,
                    level=str(level),
                    model=cfg.model,
                    n=cfg.n,
                    max_new_tokens=cfg.data_max_new_tokens,
                    temperature=cfg.temperature,
                    seed=cfg.seed,
                    batch_size=cfg.batch_size,
                ),
                root / "data" / name,
                model=base,
            )
            given = built.dataset
        datasets[item] = given
    return datasets


def drift_experiment(
    cfg: DriftConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    model: Model | None = None,
    judge: Any = None,
    rerun_from: str | None = None,
    say: Any = None,
) -> DriftResult:
    """Run (or resume) the experiment into ``out`` (see the module docstring); ``model`` may be passed pre-loaded,
    ``judge`` as a judge object (default: built from ``cfg.judge``). ``rerun_from`` forces a step (and the steps
    that use it); ``say`` (e.g. ``print``) hears which steps run again and why.

    (Long because it is the experiment's script: resolve, open the stepped run, then the five steps in order, each a
    call into a helper or another pipeline.)
    """
    from personascope.finetune.datasets import dataset_digest, load_chat_jsonl
    from personascope.models.loading import load_model
    from personascope.pipelines.common import build_judge
    from personascope.runs import RunDir
    from personascope.traits import load_trait
    from personascope.vectors import PersonaVector

    started = time.perf_counter()
    _check(cfg)
    base = model if model is not None else load_model(cfg.model)
    vectors: list[tuple[str, PersonaVector, int, TraitSpec]] = []
    for k, vpath in enumerate(cfg.vectors):
        vec = PersonaVector.load(vpath)
        vec.check_compatible(base)
        layer = chosen_layers(base, vec, cfg.layers[k] if cfg.layers is not None else None, source=vpath)[0]
        if not vec.trait:
            raise PersonascopeError(f"{vpath} names no trait; the experiment scores the vector's trait")
        vectors.append((vpath, vec, layer, load_trait(vec.trait)))
    traits = [t.name for *_, t in vectors]
    if len(set(traits)) != len(traits):
        raise PersonascopeError(f"two vectors measure the same trait ({', '.join(traits)}); give one per trait")

    judge_spec = cfg.judge or f"contrast:{cfg.model}"
    config = asdict(cfg) | {
        "judge": judge_spec,
        "resolved_layers": [layer for _, _, layer, _ in vectors],
        "vector_sha256": [dataset_digest(p) for p in cfg.vectors],
    }
    plan = drift_steps(cfg, vectors, judge_spec)
    run = RunDir(out, config, overwrite=overwrite, kind="finetune-drift", steps=plan, rerun_from=rerun_from, say=say)
    run.note("model_fingerprint", base.fingerprint())
    judge = judge if judge is not None else build_judge(judge_spec, model=base)
    measure = _Measurer(run, judge, cfg)
    root = run.path
    train_cfg = dict(cfg.finetune)

    # 1. datasets
    datasets = _datasets(cfg, base, root)
    run.step("data", "done", datasets={k: str(v) for k, v in datasets.items()})

    # 3. (base first) the base model's scores per trait
    base_scores = {t.name: measure.trait_scores(base, "base", t) for *_, t in vectors}
    done_points = {r["key"]: r for r in run.records("points")}

    def record_point(label: str, item: str, step: int | None, tuned: Model) -> None:
        for _, vec, layer, trait in vectors:
            key = f"{label}|{trait.name}"
            if key in done_points:
                continue
            shift = finetune_shift(base, tuned, vec, trait.evaluation_questions[: cfg.n_questions], progress=False)
            scores = measure.trait_scores(tuned, label, trait)
            b = base_scores[trait.name]
            row = {
                "key": key,
                "model": label,
                "dataset": item,
                "step": step,
                "trait": trait.name,
                "layer": layer,
                "shift": shift.at(layer),
                "shift_by_layer": shift.shift,
                **scores,
                "base_trait_score": b["trait_score"],
                "trait_change": scores["trait_score"] - b["trait_score"],
                "coherence_change": scores["coherence"] - b["coherence"],
            }
            run.append("points", [row])
            done_points[key] = row

    # 2 + 3. finetune every dataset (the tracked one measured on its way) and measure it
    for item, path in datasets.items():
        name = parse_dataset(item)[0]
        ft_cfg = FinetuneConfig(dataset=str(path), model=cfg.model, **train_cfg)
        ft_dir = root / "finetune" / name
        if item == cfg.track:
            steps = total_steps(len(load_chat_jsonl(path, limit=ft_cfg.limit)), ft_cfg.resolved())
            for stop in range(cfg.track_every, steps, cfg.track_every):
                label = f"{name}@{stop}"
                if all(f"{label}|{t}" in done_points for t in traits):
                    continue
                partial = finetune(ft_cfg, ft_dir, model=base, stop_after=stop)
                if partial.steps != stop:  # the run had finished already: this checkpoint can no longer be measured
                    continue
                record_point(label, item, stop, partial.model)
        if all(f"{name}|{t}" in done_points for t in traits):
            continue  # measured in an earlier call
        result = finetune(ft_cfg, ft_dir, model=base)
        record_point(name, item, result.steps, result.model)
        del result
    run.step("finetune", "done")
    run.step("measure", "done", points=len(done_points))

    # 4. screening: projection difference of each dataset against the base model's own answers
    screens = _screens(cfg, run, base, vectors, datasets)
    run.step("screen", "done")

    # 5. the steering comparison
    compare_rows: list[dict[str, Any]] = []
    if cfg.compare is not None:
        compare_rows = _compare(cfg, run, base, judge, vectors, datasets[cfg.compare], train_cfg)
    run.step("compare", "done", rows=len(compare_rows))

    points = [done_points[k] for k in sorted(done_points)]
    for p in points:
        s = screens.get((p["dataset"], p["trait"]))
        p["projection_difference"] = s["projection_difference"] if s is not None and _is_final(p) else None
    summary = _summarise(points, traits, cfg)
    _write(run, points, summary, compare_rows, traits)
    run.step("experiment", "done", seconds=time.perf_counter() - started)
    return DriftResult(root, points, summary, compare_rows, time.perf_counter() - started)


def _screens(
    cfg: DriftConfig,
    run: RunDir,
    base: Model,
    vectors: Sequence[tuple[str, PersonaVector, int, TraitSpec]],
    datasets: dict[str, Path],
) -> dict[tuple[str, str], dict[str, Any]]:
    """Step 4: the projection difference of every dataset on every vector, against the base model's own answers."""
    from personascope.finetune.datasets import load_chat_jsonl, write_chat_jsonl

    screens: dict[tuple[str, str], dict[str, Any]] = {}
    root = run.path
    for item, path in datasets.items():
        name = parse_dataset(item)[0]
        examples = load_chat_jsonl(path)
        prompts = [split_prompt(ex.messages)[0] for ex in examples]
        reference = root / "screen" / f"{name}.reference.jsonl"
        if not reference.is_file():
            answers = _base_answers(run, base, prompts, cfg)
            pairs = zip(prompts, answers, strict=True)
            write_chat_jsonl(reference, [[*p, {"role": "assistant", "content": a}] for p, a in pairs])
        for vpath, _, layer, trait in vectors:
            res = screen_dataset(
                ScreenConfig(
                    dataset=str(path),
                    vector=vpath,
                    model=cfg.model,
                    layer=layer,
                    reference=str(reference),
                    seed=cfg.seed,
                    batch_size=cfg.batch_size,
                ),
                root / "screen" / f"{name}-{trait.name}",
                model=base,
            )
            screens[(item, trait.name)] = {
                "projection_difference": res.projection_difference,
                "n_flagged": res.n_flagged,
                "threshold": res.threshold,
                "n": res.n,
            }
    return screens


def _compare(
    cfg: DriftConfig,
    run: RunDir,
    base: Model,
    judge: Judge,
    vectors: Sequence[tuple[str, PersonaVector, int, TraitSpec]],
    dataset: Path,
    train_cfg: dict[str, Any],
) -> list[dict[str, Any]]:
    """Plain finetune (with post-hoc steering), preventative steering and CAFT on one dataset, evaluated alike."""
    assert cfg.compare is not None
    trait_name = cfg.compare.partition(":")[0]
    vpath, _, layer, trait = next((v for v in vectors if v[3].name == trait_name), vectors[0])
    name = parse_dataset(cfg.compare)[0]
    root = run.path / "finetune"
    plans: list[tuple[str, Path, FinetuneConfig, list[float]]] = [
        (
            "finetune",
            root / name,
            FinetuneConfig(dataset=str(dataset), model=cfg.model, **train_cfg),
            cfg.posthoc_coefs,
        ),
        (
            f"preventative steering (+{cfg.steer_coef:g}·v in training)",
            root / f"{name}+steer",
            FinetuneConfig(
                dataset=str(dataset), model=cfg.model, steer=vpath, layer=layer, coef=cfg.steer_coef, **train_cfg
            ),
            [],
        ),
        (
            "CAFT (v ablated in training)",
            root / f"{name}+caft",
            FinetuneConfig(dataset=str(dataset), model=cfg.model, ablate=vpath, layer=layer, **train_cfg),
            [],
        ),
    ]
    rows: list[dict[str, Any]] = []
    for k, (method, ft_dir, ft_cfg, posthoc) in enumerate(plans):
        tuned = finetune(ft_cfg, ft_dir, model=base).model
        result = evaluate_finetune(
            EvaluateConfig(
                finetune=str(ft_dir),
                vector=vpath,
                model=cfg.model,
                judge=cfg.judge or f"contrast:{cfg.model}",
                trait=trait.name,
                layer=layer,
                coefs=[0.0, *posthoc],
                n_questions=cfg.n_questions,
                samples_per_question=cfg.samples_per_question,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                seed=cfg.seed,
                batch_size=cfg.batch_size,
                mcq=True,
                mcq_limit=cfg.mcq_limit,
            ),
            run.path / "compare" / f"method-{k}",
            base=base,
            tuned=tuned,
            judge=judge,
        )
        for cell in result.cells:
            if cell.model == "base" and k > 0:
                continue
            rows.append(
                {"method": _method_label(cell, method), "trait_name": trait.name, "layer": layer, **asdict(cell)}
            )
    return rows


def _method_label(cell: EvalCell, method: str) -> str:
    if cell.model == "base":
        return "base model"
    if cell.coef == 0:
        return method
    return f"{method} + post-hoc steering (−{cell.coef:g}·v at inference)"
