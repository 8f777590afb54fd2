"""Preference runs: elicit → fit → probe → personas → steer, in one resumable run directory.

:func:`run_elicit` creates the run: it picks the tasks, writes them (``tasks.jsonl``) and the personas
(``personas.json``) into the directory, and elicits pairwise choices for every persona with active pair selection
(:func:`~personascope.preferences.pairs.run_active`). Each answered pair is appended to ``pairs.jsonl`` under the key
``persona|a|b`` as soon as its chunk is done; the active loop is deterministic, so a resumed run replays the answers
on disk and asks the model only about pairs it has not answered (the file is the cache). The other steps read the
run's config from its manifest and write their own files next to it:

============================  =======================================================================
``fit``                       ``utilities-P.csv`` and ``fit.json`` / ``fit.md`` (hold-out metrics)
``probe``                     ``activations-P.safetensors`` (cached), ``probe-P.{csv,md,json,png}``, the
                              probe directions as a PersonaVector ``probe-P.safetensors``
``personas``                  ``persona-matrix.{csv,md,json,png}``: utility correlations and probe transfer
``steer``                     ``steer.jsonl`` (resumable), ``steer.{csv,md,json,png}``
============================  =======================================================================
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from personascope.errors import PersonascopeError
from personascope.io import atomic_open, atomic_path, read_jsonl
from personascope.models.registry import DEFAULT_MODEL
from personascope.preferences.elicit import (
    MODES,
    LogprobFn,
    PairChoice,
    revealed_choices,
    stated_choices,
    task_conversation,
)
from personascope.preferences.pairs import ActiveStep, default_budget, run_active
from personascope.preferences.personas import Persona, load_personas
from personascope.preferences.probes import DEFAULT_ALPHAS, FeatureScore, ProbeReport, evaluate_probes, select_ridge
from personascope.preferences.steer import SteerPoint, random_direction, steered_choice_probs, swing
from personascope.preferences.tasks import Task, load_tasks, topics
from personascope.preferences.thurstonian import fit_thurstonian, holdout_evaluate
from personascope.residual.steering import chosen_layers
from personascope.runs import MANIFEST, RunDir

if TYPE_CHECKING:
    from personascope.models.loading import Model

__all__ = [
    "DEFAULT_STEER_COEFS",
    "ElicitConfig",
    "ElicitResult",
    "FitResult",
    "PersonasResult",
    "PrefsRun",
    "ProbeRunResult",
    "SteerResult",
    "check_elicit_config",
    "open_run",
    "run_elicit",
    "run_fit",
    "run_personas",
    "run_probe",
    "run_steer",
    "select_tasks",
]

DEFAULT_STEER_COEFS: tuple[float, ...] = (-0.5, -0.25, 0.25, 0.5)
_KIND = "preferences"
EmbedFn = Callable[[list[str]], Any]


# ---------------------------------------------------------------------------------------------------------- config


@dataclass
class ElicitConfig:
    """What a preference run elicits. ``n_tasks=None`` takes every task (after the ``topics`` filter);
    ``budget=None`` is ``⌈2·N·log2 N⌉`` comparisons per persona; ``batch_pairs=None`` is ``N`` per active round."""

    model: str = DEFAULT_MODEL
    personas: list[str] = field(default_factory=lambda: ["assistant"])
    personas_file: str | None = None
    tasks_file: str | None = None
    n_tasks: int | None = None
    topics: list[str] | None = None
    mode: str = "logprob"
    budget: int | None = None
    batch_pairs: int | None = None
    initial_degree: int = 2
    threshold: float = 0.99
    samples: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 16


def select_tasks(tasks: list[Task], n_tasks: int | None, topic_filter: Sequence[str] | None, seed: int) -> list[Task]:
    """Tasks of the chosen topics; ``n_tasks`` of them, stratified by split and spread evenly over topics.

    Each split gets its share of ``n_tasks`` in proportion to the pool (at least 3 where the pool has them, so
    probes can be trained, tuned and tested), and within a split the topics take turns, each giving a random
    (``seed``) task of its own. The result keeps the pool's order.
    """
    pool = tasks
    if topic_filter:
        known = set(topics(tasks))
        unknown = [t for t in topic_filter if t not in known]
        if unknown:
            raise PersonascopeError(f"unknown topic {unknown[0]!r}; known topics: {', '.join(sorted(known))}")
        pool = [t for t in tasks if t.topic in set(topic_filter)]
    if n_tasks is not None and n_tasks > len(pool):
        raise PersonascopeError(f"asked for {n_tasks} tasks but only {len(pool)} are available")
    if n_tasks is None or n_tasks == len(pool):
        return list(pool)
    if n_tasks < 2:
        raise PersonascopeError("choose at least 2 tasks")
    rng = np.random.default_rng(seed)
    by_split = {s: [t for t in pool if t.split == s] for s in ("train", "val", "test")}
    quota = {s: min(len(v), max(min(3, len(v)), round(n_tasks * len(v) / len(pool)))) for s, v in by_split.items()}
    while sum(quota.values()) > n_tasks:  # trim the largest share first
        biggest = max(quota, key=lambda s: quota[s])
        quota[biggest] -= 1
    while sum(quota.values()) < n_tasks:  # top up where tasks are left
        room = [s for s in quota if quota[s] < len(by_split[s])]
        quota[max(room, key=lambda s: len(by_split[s]) - quota[s])] += 1
    chosen: set[str] = set()
    for split, part in by_split.items():
        names = sorted({t.topic for t in part})
        offset = int(rng.integers(len(names))) if names else 0
        names = names[offset:] + names[:offset]  # which topics get one more task varies by split
        queues = {}
        for name in names:
            mine = [t for t in part if t.topic == name]
            queues[name] = [mine[int(i)] for i in rng.permutation(len(mine))]
        taken = 0
        while taken < quota[split]:
            for name in names:
                if queues[name] and taken < quota[split]:
                    chosen.add(queues[name].pop(0).id)
                    taken += 1
    return [t for t in pool if t.id in chosen]


def _resolve_personas(names: Sequence[str], path: str | None) -> list[Persona]:
    if not names:
        raise PersonascopeError("choose at least one persona")
    if len(set(names)) != len(names):
        raise PersonascopeError("a persona is listed twice; list each persona once")
    known = {p.name: p for p in load_personas(path)}
    missing = [n for n in names if n not in known]
    if missing:
        raise PersonascopeError(f"unknown persona {missing[0]!r}; known personas: {', '.join(known)}")
    return [known[n] for n in names]


def check_elicit_config(cfg: ElicitConfig) -> tuple[list[Persona], list[Task]]:
    """Validate a config without touching a model; return its personas and selected tasks."""
    _check_config(cfg)
    personas = _resolve_personas(cfg.personas, cfg.personas_file)
    tasks = select_tasks(load_tasks(cfg.tasks_file), cfg.n_tasks, cfg.topics, cfg.seed)
    if len(tasks) < 2:
        raise PersonascopeError("a preference run needs at least 2 tasks")
    return personas, tasks


def _check_config(cfg: ElicitConfig) -> None:
    if cfg.mode not in MODES:
        raise PersonascopeError(f"unknown choice mode {cfg.mode!r}; use logprob or revealed")
    for name in ("batch_size", "samples", "max_new_tokens", "initial_degree"):
        if getattr(cfg, name) < 1:
            raise PersonascopeError(f"{name} must be at least 1")
    if cfg.budget is not None and cfg.budget < 1:
        raise PersonascopeError("budget must be at least 1 comparison")
    if cfg.batch_pairs is not None and cfg.batch_pairs < 1:
        raise PersonascopeError("batch_pairs must be at least 1")


def _write_tasks(path: Path, tasks: Sequence[Task]) -> None:
    with atomic_open(path) as fh:
        for t in tasks:
            fh.write(json.dumps({"id": t.id, "text": t.text, "topic": t.topic, "split": t.split}) + "\n")


@dataclass
class PrefsRun:
    """An opened preference run: its directory, config, tasks and personas."""

    run: RunDir
    config: ElicitConfig
    tasks: list[Task]
    personas: list[Persona]

    @property
    def path(self) -> Path:
        return self.run.path

    def persona(self, name: str | None) -> Persona:
        if name is None:
            return self.personas[0]
        for p in self.personas:
            if p.name == name:
                return p
        raise PersonascopeError(
            f"persona {name!r} is not part of this run; it has {', '.join(p.name for p in self.personas)}"
        )

    def load_model(self, model: Model | None = None, device: str | None = None) -> Model:
        """``model`` (or the run's model, loaded) after checking it is the model the run was made with."""
        from personascope.models import load_model

        m = model if model is not None else load_model(self.config.model, device=device)
        expected = self.run.manifest.get("model_fingerprint")
        if expected is not None and m.fingerprint() != expected:
            raise PersonascopeError(
                f"{self.path} was made with another model (fingerprint {expected}, this one {m.fingerprint()}); "
                "use the run's model"
            )
        if expected is None:
            self.run.note("model_fingerprint", m.fingerprint())
        return m


def open_run(path: str | Path) -> PrefsRun:
    """Open an existing preference run directory (made by :func:`run_elicit`)."""
    root = Path(path)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise PersonascopeError(f"{root} is not a run directory (no {MANIFEST}); run `personascope prefs elicit` first")
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        raise PersonascopeError(f"{manifest} is not valid JSON") from None
    if not isinstance(data, dict) or data.get("kind") != _KIND:
        raise PersonascopeError(f"{root} is not a preference run (made by `personascope prefs elicit`)")
    config = data.get("config", {})
    run = RunDir(root, config, kind=_KIND)
    fields = {k: config[k] for k in ElicitConfig.__dataclass_fields__ if k in config}
    cfg = ElicitConfig(**fields)
    tasks = load_tasks(root / "tasks.jsonl")
    personas = load_personas(root / "personas.json")
    return PrefsRun(run, cfg, tasks, personas)


# --------------------------------------------------------------------------------------------------------- elicit


@dataclass
class ElicitResult:
    run_dir: Path
    n_tasks: int
    per_persona: dict[str, dict[str, Any]]
    seconds: float


def _pair_seed(persona: str, a: str, b: str, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}|{persona}|{a}|{b}".encode()).digest()
    return int.from_bytes(digest[:3], "big")  # small enough that derived per-sample seeds stay far below 2**63


def run_elicit(
    cfg: ElicitConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    model: Model | None = None,
    device: str | None = None,
    logprob_fn: LogprobFn | None = None,
    progress: bool = True,
) -> ElicitResult:
    """Create (or resume) a preference run in ``out`` and elicit choices for every persona (module docstring)."""
    started = time.perf_counter()
    personas, tasks = check_elicit_config(cfg)
    config = asdict(cfg) | {
        "task_ids": [t.id for t in tasks],
        "tasks_sha": hashlib.sha256(json.dumps([asdict(t) for t in tasks]).encode()).hexdigest()[:16],
        "persona_prompts": {p.name: p.system_prompt for p in personas},
    }
    run = RunDir(out, config, overwrite=overwrite, kind=_KIND)
    _write_tasks(run.file("tasks.jsonl"), tasks)
    with atomic_open(run.file("personas.json")) as fh:
        json.dump([asdict(p) for p in personas], fh, indent=2)
    prefs = PrefsRun(run, cfg, tasks, personas)
    m = prefs.load_model(model, device)
    n = len(tasks)
    budget = cfg.budget if cfg.budget is not None else default_budget(n)
    summary: dict[str, dict[str, Any]] = {}
    for persona in personas:
        step = f"elicit:{persona.name}"
        if run.step_done(step):
            summary[persona.name] = run.manifest["steps"][step]
            continue
        info = _elicit_persona(prefs, m, persona, budget, logprob_fn, progress)
        run.step(step, "done", **info)
        summary[persona.name] = run.manifest["steps"][step]
    return ElicitResult(run.path, n, summary, time.perf_counter() - started)


def _elicit_persona(
    prefs: PrefsRun, model: Model, persona: Persona, budget: int, logprob_fn: LogprobFn | None, progress: bool
) -> dict[str, Any]:
    cfg, tasks, run = prefs.config, prefs.tasks, prefs.run
    ids = [t.id for t in tasks]
    text = {t.id: t.text for t in tasks}
    cache: dict[tuple[str, str], float] = {
        (r["a"], r["b"]): float(r["p"]) for r in run.records("pairs") if r.get("persona") == persona.name
    }
    chunk = max(1, 4 * cfg.batch_size)
    asked = {"model": 0}

    def ask(batch: list[tuple[str, str]]) -> list[PairChoice]:
        texts = [(text[a], text[b]) for a, b in batch]
        if cfg.mode == "revealed":
            return revealed_choices(
                model,
                texts,
                persona.system_prompt,
                samples=cfg.samples,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                seeds=[_pair_seed(persona.name, a, b, cfg.seed) for a, b in batch],
                batch_size=cfg.batch_size,
            )
        return stated_choices(model, texts, persona.system_prompt, batch_size=cfg.batch_size, logprob_fn=logprob_fn)

    def judge(batch: np.ndarray) -> np.ndarray:
        out = np.empty(batch.shape[0], dtype=np.float64)
        todo: list[int] = []
        for k, (i, j) in enumerate(batch.tolist()):
            a, b = ids[i], ids[j]
            if (a, b) in cache:
                out[k] = cache[(a, b)]
            elif (b, a) in cache:
                out[k] = 1.0 - cache[(b, a)]
            else:
                todo.append(k)
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            names = [(ids[int(batch[k, 0])], ids[int(batch[k, 1])]) for k in part]
            choices = ask(names)
            records = []
            for k, (a, b), c in zip(part, names, choices, strict=True):
                out[k] = c.p
                cache[(a, b)] = c.p
                records.append(
                    {
                        "key": f"{persona.name}|{a}|{b}",
                        "persona": persona.name,
                        "a": a,
                        "b": b,
                        "p": c.p,
                        "p_ab": c.p_ab,
                        "p_ba": c.p_ba,
                        "mass": c.mass,
                    }
                )
            run.append("pairs", records)
            asked["model"] += len(records)
        return out

    bar = tqdm(total=budget, desc=f"elicit {persona.name}", unit="pair", disable=not progress)
    rounds = {"n": 0, "spearman": math.nan}

    def on_batch(step: ActiveStep) -> None:
        bar.update(step.pairs.shape[0] - bar.n)
        rounds["n"], rounds["spearman"] = step.round, step.spearman

    try:
        pairs, _, _ = run_active(
            len(tasks),
            judge,
            budget=budget,
            batch_size=cfg.batch_pairs,
            seed=cfg.seed,
            on_batch=on_batch,
            initial_degree=min(cfg.initial_degree, len(tasks) - 1),
            threshold=cfg.threshold,
        )
    finally:
        bar.close()
    mass = [r["mass"] for r in run.records("pairs") if r.get("persona") == persona.name]
    return {
        "n_pairs": int(pairs.shape[0]),
        "budget": int(budget),
        "rounds": int(rounds["n"]),
        "last_spearman": None if math.isnan(float(rounds["spearman"])) else float(rounds["spearman"]),
        "stopped_before_budget": bool(pairs.shape[0] < budget),  # the ranking settled (or no new pair was left)
        "asked_model": asked["model"],
        "mean_label_mass": float(np.mean(mass)) if mass else None,
        "position_bias": _position_bias(run, persona.name),
    }


def _position_bias(run: RunDir, persona: str) -> float | None:
    """Mean P(label A) over both orders of every pair: 0.5 without position bias."""
    recs = [r for r in run.records("pairs") if r.get("persona") == persona]
    if not recs:
        return None
    return float(np.mean([0.5 * (r["p_ab"] + r["p_ba"]) for r in recs]))


# ------------------------------------------------------------------------------------------------------------ fit


@dataclass
class FitResult:
    run_dir: Path
    metrics: dict[str, dict[str, Any]]  # persona → hold-out metrics and fit facts
    utilities: dict[str, np.ndarray]


def _pair_records(prefs: PrefsRun, pairs_file: str | Path | None) -> list[dict[str, Any]]:
    """Pair records from the run (or an external JSONL file), checked against the run's tasks and personas."""
    ids = {t.id for t in prefs.tasks}
    if pairs_file is None:
        rows = [(i + 1, r) for i, r in enumerate(prefs.run.records("pairs"))]
        where = str(prefs.run.file("pairs.jsonl"))
    else:
        rows = read_jsonl(pairs_file)
        where = str(pairs_file)
    out = []
    for line, r in rows:
        if not isinstance(r, dict) or not {"persona", "a", "b", "p"} <= set(r):
            raise PersonascopeError(f'{where}:{line}: a pair record needs "persona", "a", "b" and "p"')
        for side in ("a", "b"):
            if r[side] not in ids:
                raise PersonascopeError(f"{where}:{line}: task id {r[side]!r} is not one of the run's tasks")
        if r["a"] == r["b"]:
            raise PersonascopeError(f"{where}:{line}: a pair compares task {r['a']!r} with itself")
        p = r["p"]
        if isinstance(p, bool) or not isinstance(p, int | float) or not (0.0 <= float(p) <= 1.0):
            raise PersonascopeError(f"{where}:{line}: p = {p!r} is not a probability in [0, 1]")
        out.append(r)
    return out


def run_fit(
    path: str | Path,
    *,
    sigma_reg: float = 1e-2,
    holdout: float = 0.05,
    pairs_file: str | Path | None = None,
    seed: int = 0,
) -> FitResult:
    """Fit Thurstonian utilities for every persona of the run and score them on held-out pairs."""
    prefs = open_run(path)
    records = _pair_records(prefs, pairs_file)
    index = {t.id: i for i, t in enumerate(prefs.tasks)}
    n = len(prefs.tasks)
    metrics: dict[str, dict[str, Any]] = {}
    utilities: dict[str, np.ndarray] = {}
    for persona in prefs.personas:
        mine = [r for r in records if r["persona"] == persona.name]
        if not mine:
            raise PersonascopeError(
                f"no choices for persona {persona.name!r} in {prefs.path}; run `personascope prefs elicit` first"
            )
        pairs = np.array([[index[r["a"]], index[r["b"]]] for r in mine], dtype=np.int64)
        p = np.array([float(r["p"]) for r in mine], dtype=np.float64)
        fit = fit_thurstonian(n, pairs, p, sigma_reg=sigma_reg)
        held = holdout_evaluate(n, pairs, p, frac=holdout, seed=seed, sigma_reg=sigma_reg) if len(mine) >= 4 else {}
        counts = np.bincount(pairs.reshape(-1), minlength=n)
        with atomic_open(prefs.run.file(f"utilities-{persona.name}.csv")) as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "topic", "split", "mu", "sigma", "n_comparisons"])
            for t, mu, sd, c in zip(prefs.tasks, fit.mu, fit.sigma, counts, strict=True):
                writer.writerow([t.id, t.topic, t.split, f"{mu:.6f}", f"{sd:.6f}", int(c)])
        utilities[persona.name] = fit.mu
        metrics[persona.name] = {
            "n_pairs": len(mine),
            "n_tasks": n,
            "uncompared": int(fit.uncompared.size),
            "converged": fit.converged,
            "nll_per_pair": fit.nll / len(mine),
            **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in held.items()},
        }
    with atomic_open(prefs.run.file("fit.json")) as fh:
        json.dump({"sigma_reg": sigma_reg, "holdout": holdout, "personas": metrics}, fh, indent=2)
    with atomic_open(prefs.run.file("fit.md")) as fh:
        fh.write(_fit_table(metrics) + "\n")
    prefs.run.step("fit", "done", sigma_reg=sigma_reg, holdout=holdout, pairs_file=str(pairs_file or ""))
    return FitResult(prefs.path, metrics, utilities)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _fit_table(metrics: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| persona | pairs | held-out acc | held-out log-loss | ceiling log-loss | train acc |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in metrics.items():
        lines.append(
            f"| {name} | {m['n_pairs']} | {_fmt(m.get('test_accuracy'))} | {_fmt(m.get('test_log_loss'))} | "
            f"{_fmt(m.get('ceiling_log_loss'))} | {_fmt(m.get('train_accuracy'))} |"
        )
    return "\n".join(lines)


def load_utilities(prefs: PrefsRun, persona: str) -> np.ndarray:
    """The fitted utilities of ``persona`` in task order (from ``utilities-P.csv``)."""
    path = prefs.run.file(f"utilities-{persona}.csv")
    if not path.is_file():
        raise PersonascopeError(
            f"no utilities for persona {persona!r} in {prefs.path}; run `personascope prefs fit` first"
        )
    with path.open(encoding="utf-8") as fh:
        rows = {r["id"]: float(r["mu"]) for r in csv.DictReader(fh)}
    missing = [t.id for t in prefs.tasks if t.id not in rows]
    if missing:
        raise PersonascopeError(f"{path} lacks task {missing[0]!r}; run `personascope prefs fit` again")
    return np.array([rows[t.id] for t in prefs.tasks], dtype=np.float64)


# ------------------------------------------------------------------------------------------------- activations


def task_activations(prefs: PrefsRun, model: Model, persona: Persona, batch_size: int = 16) -> torch.Tensor:
    """Residual activations at the last prompt token of every task's single-task prompt under ``persona``,
    ``[tasks, num_layers + 1, hidden]``, cached in ``activations-P.safetensors``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from personascope.residual.capture import capture

    path = prefs.run.file(f"activations-{persona.name}.safetensors")
    meta = {
        "model_fingerprint": model.fingerprint(),
        "tasks_sha": str(prefs.run.config.get("tasks_sha", "")),
        "system_prompt_sha": hashlib.sha256(persona.system_prompt.encode()).hexdigest()[:16],
        "reduction": "prompt_last",
    }
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}) == meta:
                cached: torch.Tensor = f.get_tensor("prompt_last")
                return cached
    convs = [task_conversation(t.text, persona.system_prompt) for t in prefs.tasks]
    acts = capture(model, convs, reductions=["prompt_last"], batch_size=batch_size)["prompt_last"]
    with atomic_path(path) as tmp:
        save_file({"prompt_last": acts.contiguous()}, str(tmp), metadata=meta)
    return acts


def _embeddings(prefs: PrefsRun, embed_fn: EmbedFn | None) -> np.ndarray:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = prefs.run.file("embeddings.safetensors")
    meta = {"tasks_sha": str(prefs.run.config.get("tasks_sha", "")), "embedder": "custom" if embed_fn else "minilm"}
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}) == meta:
                return np.asarray(f.get_tensor("embeddings").numpy(), dtype=np.float64)
    if embed_fn is None:
        from personascope.preferences.embed import embed_texts

        embed_fn = embed_texts
    emb = np.asarray(embed_fn([t.text for t in prefs.tasks]), dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(prefs.tasks):
        raise PersonascopeError(f"the embedder returned shape {emb.shape} for {len(prefs.tasks)} tasks")
    with atomic_path(path) as tmp:
        save_file({"embeddings": torch.from_numpy(emb).contiguous()}, str(tmp), metadata=meta)
    return emb.astype(np.float64)


# ---------------------------------------------------------------------------------------------------------- probe


@dataclass
class ProbeRunResult:
    run_dir: Path
    persona: str
    report: ProbeReport
    files: dict[str, Path]


def run_probe(
    path: str | Path,
    *,
    persona: str | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    embed: bool = True,
    embed_fn: EmbedFn | None = None,
    model: Model | None = None,
    device: str | None = None,
    batch_size: int = 16,
    n_pairs: int = 2000,
    loto: bool = True,
    n_shuffles: int = 10,
    seed: int = 0,
) -> ProbeRunResult:
    """Train and score ridge probes on every layer for one persona's utilities, with the baselines."""
    from personascope.report.prefs_plots import plot_probe_layers
    from personascope.vectors import PersonaVector

    prefs = open_run(path)
    who = prefs.persona(persona)
    y = load_utilities(prefs, who.name)
    m = prefs.load_model(model, device)
    feats = task_activations(prefs, m, who, batch_size).numpy()
    baselines = {"embedding": _embeddings(prefs, embed_fn)} if embed else {}
    splits = [t.split for t in prefs.tasks]
    topic_list = [t.topic for t in prefs.tasks]
    report = evaluate_probes(
        feats,
        y,
        splits,
        topic_list,
        baselines=baselines,
        alphas=alphas,
        n_pairs=n_pairs,
        seed=seed,
        loto=loto,
        n_shuffles=n_shuffles,
    )
    stem = f"probe-{who.name}"
    files = {
        "csv": prefs.run.file(f"{stem}.csv"),
        "md": prefs.run.file(f"{stem}.md"),
        "json": prefs.run.file(f"{stem}.json"),
        "png": prefs.run.file(f"{stem}.png"),
        "vector": prefs.run.file(f"{stem}.safetensors"),
    }
    rows = report.rows()
    with atomic_open(files["csv"]) as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with atomic_open(files["md"]) as fh:
        fh.write(probe_table(report) + "\n")
    summary = {
        "persona": who.name,
        "best_layer": report.best_layer,
        "best": report.best.as_row(),
        "shuffled_at_best": next(s.as_row() for s in report.shuffled if s.layer == report.best_layer),
        "baselines": {k: v.as_row() for k, v in report.baselines.items()},
        "alphas": list(alphas),
        "n_tasks": len(prefs.tasks),
    }
    with atomic_open(files["json"]) as fh:
        json.dump(_clean(summary), fh, indent=2)
    plot_probe_layers(report, files["png"], title=f"utility probes ({who.name}, {m.name})")
    unit = torch.from_numpy(report.directions).float()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    PersonaVector.for_model(
        m,
        unit,
        trait="preference",
        method="ridge_probe",
        persona=who.name,
        chosen_layer=report.best_layer,
        source_run=str(prefs.path),
        test_r=[s.test_r for s in report.layers],
    ).save(files["vector"])
    prefs.run.step(f"probe:{who.name}", "done", best_layer=report.best_layer, test_r=_clean(report.best.test_r))
    return ProbeRunResult(prefs.path, who.name, report, files)


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN becomes None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _score_cells(s: FeatureScore) -> str:
    return (
        f"{_fmt(s.test_r)} [{_fmt(s.test_r_low)}, {_fmt(s.test_r_high)}] | {_fmt(s.test_pair_acc)} | "
        f"{_fmt(s.loto_r)} | {_fmt(s.loto_within_r)} | {s.alpha:g} | {_fmt(s.val_r)}"
    )


def probe_table(report: ProbeReport) -> str:
    """Markdown: one row per layer (best marked) and per baseline."""
    lines = [
        "| features | test r [95% CI] | test pair acc | leave-topic-out r (pooled) | leave-topic-out r (within) "
        "| α | val r | shuffled r [null 95%] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    shuffled = {s.layer: s for s in report.shuffled}
    for s in report.layers:
        mark = " (best)" if s.layer == report.best_layer else ""
        sh = shuffled.get(s.layer)
        null = f"{_fmt(sh.test_r)} [{_fmt(sh.test_r_low)}, {_fmt(sh.test_r_high)}]" if sh else "—"
        lines.append(f"| layer {s.layer}{mark} | {_score_cells(s)} | {null} |")
    for name, s in report.baselines.items():
        lines.append(f"| {name} baseline | {_score_cells(s)} | — |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- personas


@dataclass
class PersonasResult:
    run_dir: Path
    names: list[str]
    utility_r: np.ndarray  # [P, P] over all tasks
    baseline_r: np.ndarray  # [P, P] on test tasks: persona i's utilities as the prediction of j's
    probe_r: np.ndarray  # [P, P] on test tasks: probe trained under i, applied to j's activations, vs j's utilities
    layers: dict[str, int]  # each source persona's probe layer (best validation r)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3 or np.ptp(a) < 1e-12 or np.ptp(b) < 1e-12:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def run_personas(
    path: str | Path,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    layer: int | None = None,
    model: Model | None = None,
    device: str | None = None,
    batch_size: int = 16,
) -> PersonasResult:
    """Compare the run's personas: utility correlations and how probes transfer across personas."""
    from personascope.report.prefs_plots import plot_persona_matrices

    prefs = open_run(path)
    if len(prefs.personas) < 2:
        raise PersonascopeError(
            "comparing personas needs a run with at least two (prefs elicit --persona A --persona B)"
        )
    names = [p.name for p in prefs.personas]
    utils = {n: load_utilities(prefs, n) for n in names}
    m = prefs.load_model(model, device)
    if layer is not None:
        m.check_layer(layer)
    feats = {p.name: task_activations(prefs, m, p, batch_size).numpy().astype(np.float64) for p in prefs.personas}
    split = np.array([t.split for t in prefs.tasks])
    tr, va, te = split == "train", split == "val", split == "test"
    for name, mask in (("train", tr), ("val", va), ("test", te)):
        if mask.sum() < 3:
            raise PersonascopeError(f"the {name} split has {int(mask.sum())} tasks; use more tasks (at least 3 each)")
    k = len(names)
    utility_r, baseline_r, probe_r = (np.full((k, k), np.nan) for _ in range(3))
    layers: dict[str, int] = {}
    for i, src in enumerate(names):
        x, y = feats[src], utils[src]
        candidates = [layer] if layer is not None else list(range(x.shape[1]))
        best: tuple[float, int, Any] | None = None
        for cand in candidates:
            probe, val_r = select_ridge(x[tr, cand], y[tr], x[va, cand], y[va], alphas)
            score = -math.inf if math.isnan(val_r) else val_r
            if best is None or score > best[0]:
                best = (score, cand, probe)
        assert best is not None
        _, chosen, probe = best
        layers[src] = int(chosen)
        for j, dst in enumerate(names):
            utility_r[i, j] = _corr(utils[src], utils[dst])
            baseline_r[i, j] = _corr(utils[src][te], utils[dst][te])
            probe_r[i, j] = _corr(probe.predict(feats[dst][te, chosen]), utils[dst][te])
    result = PersonasResult(prefs.path, names, utility_r, baseline_r, probe_r, layers)
    _write_personas(prefs, result)
    plot_persona_matrices(
        names,
        {
            "utility correlation (all tasks)": utility_r,
            "probe trained on row, tested on column": probe_r,
            "row utilities predicting column (test)": baseline_r,
        },
        prefs.run.file("persona-matrix.png"),
        title=f"personas ({m.name}, {len(prefs.tasks)} tasks)",
    )
    prefs.run.step("personas", "done", layers=layers)
    return result


def _write_personas(prefs: PrefsRun, res: PersonasResult) -> None:
    with atomic_open(prefs.run.file("persona-matrix.csv")) as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "target", "utility_r", "baseline_r", "probe_r", "probe_layer"])
        for i, src in enumerate(res.names):
            for j, dst in enumerate(res.names):
                cells = [res.utility_r[i, j], res.baseline_r[i, j], res.probe_r[i, j]]
                writer.writerow([src, dst, *(_fmt(float(c), 4) for c in cells), res.layers[src]])
    data = {
        "personas": res.names,
        "utility_r": res.utility_r.tolist(),
        "baseline_r": res.baseline_r.tolist(),
        "probe_r": res.probe_r.tolist(),
        "probe_layers": res.layers,
    }
    with atomic_open(prefs.run.file("persona-matrix.json")) as fh:
        json.dump(_clean(data), fh, indent=2)
    with atomic_open(prefs.run.file("persona-matrix.md")) as fh:
        fh.write(personas_table(res) + "\n")


def personas_table(res: PersonasResult) -> str:
    """Markdown: for every (source, target) the utility correlation, the baseline and the probe's transfer r."""
    lines = [
        "| probe from → on | utility r (all) | baseline r (test) | probe r (test) |",
        "|---|---|---|---|",
    ]
    for i, src in enumerate(res.names):
        for j, dst in enumerate(res.names):
            lines.append(
                f"| {src} (layer {res.layers[src]}) → {dst} | {_fmt(res.utility_r[i, j])} | "
                f"{_fmt(res.baseline_r[i, j])} | {_fmt(res.probe_r[i, j])} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- steer


@dataclass
class SteerResult:
    run_dir: Path
    persona: str
    points: list[SteerPoint]
    swings: list[dict[str, Any]]
    pairs: list[tuple[str, str]]
    norms: dict[int, float]


def steering_pairs(tasks: Sequence[Task], utilities: np.ndarray, n_pairs: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n_pairs`` pairs of held-out (val/test) tasks with close utilities, each task used once where possible.

    Close pairs are where a choice can move both ways. The first task of each pair is the one steered.
    """
    held = [i for i, t in enumerate(tasks) if t.split in ("val", "test")]
    pool = held if len(held) >= 2 else list(range(len(tasks)))
    rng = np.random.default_rng(seed)
    cand = [(abs(float(utilities[i] - utilities[j])), float(rng.random()), i, j) for i in pool for j in pool if i < j]
    cand.sort()
    used: set[int] = set()
    out: list[tuple[int, int]] = []
    for _, _, i, j in cand:
        if len(out) >= n_pairs:
            break
        if i not in used and j not in used:
            out.append((i, j) if rng.random() < 0.5 else (j, i))
            used.update((i, j))
    for _, _, i, j in cand:  # not enough disjoint pairs: allow reuse
        if len(out) >= n_pairs:
            break
        if (i, j) not in out and (j, i) not in out:
            out.append((i, j))
    return out


def _tag(direction: str, mode: str, layer: int | None, vec: torch.Tensor | None, coef: float) -> str:
    """The part of a steering record's key that names its curve and coefficient (the direction by content)."""
    if vec is None:
        return "base"
    digest = hashlib.sha256(vec.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()[:10]
    return f"{direction}:{digest}|{mode}|{layer}|{coef:g}"


def run_steer(
    path: str | Path,
    *,
    persona: str | None = None,
    layers: Sequence[int] | None = None,
    coefs: Sequence[float] = DEFAULT_STEER_COEFS,
    n_pairs: int = 12,
    single: bool = True,
    random_control: bool = True,
    model: Model | None = None,
    device: str | None = None,
    batch_size: int = 16,
    seed: int = 0,
    logprob_fn: LogprobFn | None = None,
    progress: bool = True,
) -> SteerResult:
    """Steer pairwise choices with the persona's probe directions (module docstring of ``steer``)."""
    from personascope.report.prefs_plots import plot_choice_steering
    from personascope.report.stats import mean_ci
    from personascope.vectors import PersonaVector

    prefs = open_run(path)
    who = prefs.persona(persona)
    vec_path = prefs.run.file(f"probe-{who.name}.safetensors")
    if not vec_path.is_file():
        raise PersonascopeError(
            f"no probe for persona {who.name!r} in {prefs.path}; run `personascope prefs probe` first"
        )
    fracs = sorted({float(c) for c in coefs})
    if not fracs or 0.0 in fracs:
        raise PersonascopeError("give non-zero steering coefficients (the unsteered baseline is always included)")
    if n_pairs < 1:
        raise PersonascopeError("n_pairs must be at least 1")
    m = prefs.load_model(model, device)
    vector = PersonaVector.load(vec_path)
    vector.check_compatible(m)
    if layers:
        layer_list = chosen_layers(m, vector, list(layers), source=str(vec_path))
    else:  # the probe's own best layer plus one third and two thirds of the way up
        chosen = chosen_layers(m, vector, None, source=str(vec_path), flag="--layers")[0]
        layer_list = sorted({chosen, round(m.num_layers / 3), round(2 * m.num_layers / 3)})
    acts = task_activations(prefs, m, who, batch_size)
    norms = {layer: float(acts[:, layer].norm(dim=-1).mean()) for layer in layer_list}
    utils = load_utilities(prefs, who.name)
    index_pairs = steering_pairs(prefs.tasks, utils, n_pairs, seed)
    if not index_pairs:
        raise PersonascopeError("no task pairs to steer; use more tasks")
    id_pairs = [(prefs.tasks[i].id, prefs.tasks[j].id) for i, j in index_pairs]
    text_pairs = [(prefs.tasks[i].text, prefs.tasks[j].text) for i, j in index_pairs]
    run = prefs.run
    done = {r["key"]: r for r in run.records("steer")}

    def keys(tag: str) -> list[str]:
        return [f"{who.name}|{tag}|{a}|{b}" for a, b in id_pairs]

    groups: list[tuple[str, str, int | None, torch.Tensor | None, list[float]]] = [("none", "none", None, None, [0.0])]
    for layer in layer_list:
        probe_dir = vector.unit(layer)
        groups.append(("probe", "differential", layer, probe_dir, fracs))
        if single:
            groups.append(("probe", "single", layer, probe_dir, fracs))
        if random_control:
            groups.append(("random", "differential", layer, random_direction(m.hidden_size, seed + layer), fracs))
    for direction, mode, layer, vec, cs in tqdm(groups, desc="choice steering", unit="curve", disable=not progress):
        wanted = [k for c in cs for k in keys(_tag(direction, mode, layer, vec, c))]
        if all(k in done for k in wanted):
            continue
        if vec is None or layer is None:
            choices = stated_choices(m, text_pairs, who.system_prompt, batch_size=batch_size, logprob_fn=logprob_fn)
            probs = np.array([[c.p for c in choices]])
        else:
            probs = steered_choice_probs(
                m,
                text_pairs,
                vec,
                layer,
                [c * norms[layer] for c in cs],
                system_prompt=who.system_prompt,
                mode=mode,
                batch_size=batch_size,
                logprob_fn=logprob_fn,
            )
        records = []
        for row, c in enumerate(cs):
            for pi, (k, (a, b)) in enumerate(zip(keys(_tag(direction, mode, layer, vec, c)), id_pairs, strict=True)):
                records.append(
                    {
                        "key": k,
                        "direction": direction,
                        "mode": mode,
                        "layer": layer,
                        "coef": c,
                        "a": a,
                        "b": b,
                        "p": float(probs[row, pi]),
                    }
                )
        run.append("steer", records)
        done.update({r["key"]: r for r in records})
    points: list[SteerPoint] = []
    base_vals = [done[k]["p"] for k in keys(_tag("none", "none", None, None, 0.0))]
    mean, ci, n = mean_ci(base_vals)
    points.append(SteerPoint("none", "none", None, 0.0, mean, ci, n))
    for d, mo, la, vec, cs in groups[1:]:
        for c in cs:
            vals = [done[k]["p"] for k in keys(_tag(d, mo, la, vec, c))]
            mean, ci, n = mean_ci(vals)
            points.append(SteerPoint(d, mo, la, c, mean, ci, n))
    swings = [
        {"direction": d, "mode": mo, "layer": la, "swing": swing(points, d, mo, la)}
        for d, mo, la, _, _ in groups[1:]
        if la is not None
    ]
    result = SteerResult(prefs.path, who.name, points, swings, id_pairs, norms)
    _write_steer(prefs, result, fracs)
    plot_choice_steering(points, prefs.run.file("steer.png"), title=f"choice steering ({who.name}, {m.name})")
    run.step(f"steer:{who.name}", "done", layers=layer_list, coefs=fracs, n_pairs=len(id_pairs))
    return result


def _write_steer(prefs: PrefsRun, res: SteerResult, fracs: list[float]) -> None:
    with atomic_open(prefs.run.file("steer.csv")) as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(res.points[0])))
        writer.writeheader()
        writer.writerows(asdict(p) for p in res.points)
    data = {
        "persona": res.persona,
        "coefs": fracs,
        "coef_unit": "fraction of the layer's mean residual norm (last prompt token of the task prompts)",
        "residual_norms": {str(k): v for k, v in res.norms.items()},
        "baseline_p": res.points[0].p,
        "swings": res.swings,
        "pairs": [list(p) for p in res.pairs],
    }
    with atomic_open(prefs.run.file("steer.json")) as fh:
        json.dump(_clean(data), fh, indent=2)
    with atomic_open(prefs.run.file("steer.md")) as fh:
        fh.write(steer_table(res) + "\n")


def steer_table(res: SteerResult) -> str:
    """Markdown: P(choose the steered task) per curve and coefficient, and each curve's swing."""
    coefs = sorted({p.coef for p in res.points if p.direction != "none"})
    head = " | ".join(f"c={c:g}" for c in coefs)
    lines = [f"| direction | mode | layer | {head} | swing |", "|---|---|---|" + "---|" * (len(coefs) + 1)]
    by = {(p.direction, p.mode, p.layer, p.coef): p for p in res.points}
    for s in res.swings:
        cells = " | ".join(_fmt(by[(s["direction"], s["mode"], s["layer"], c)].p) for c in coefs)
        lines.append(f"| {s['direction']} | {s['mode']} | {s['layer']} | {cells} | {_fmt(s['swing'])} |")
    lines.append(f"\nunsteered P(choose the steered task) = {_fmt(res.points[0].p)} over {res.points[0].n} pairs")
    return "\n".join(lines)
