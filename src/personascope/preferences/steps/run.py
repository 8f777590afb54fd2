"""The preference run every step shares: its config, the task selection, creating and opening the run directory, and
the run's cached tensors (task activations per persona, task embeddings).

Both caches go through the run directory's one tensor cache (:meth:`~personascope.runs.RunDir.cached_tensors`):
``activations-P.safetensors`` is keyed by the model's fingerprint, the tasks, persona ``P``'s system prompt and the
reduction; ``embeddings.safetensors`` by the tasks and the embedder. Other inputs recompute them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from personascope.errors import PersonascopeError
from personascope.io import atomic_open
from personascope.models.registry import DEFAULT_MODEL
from personascope.preferences.personas import Persona, load_personas
from personascope.preferences.prompt import MODES, task_conversation
from personascope.preferences.tasks import Task, load_tasks, topics
from personascope.runs import MANIFEST, RunDir

if TYPE_CHECKING:
    from personascope.models.loading import Model

__all__ = [
    "KIND",
    "ElicitConfig",
    "EmbedFn",
    "PrefsRun",
    "check_elicit_config",
    "create_run",
    "open_run",
    "select_tasks",
    "task_activations",
    "task_embeddings",
]

#: The ``kind`` of a preference run's manifest.
KIND = "preferences"
#: A text embedder for the embedding baseline: texts → ``[len(texts), dim]``.
EmbedFn = Callable[[list[str]], Any]


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


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def create_run(cfg: ElicitConfig, out: str | Path, *, overwrite: bool = False) -> PrefsRun:
    """Create (or resume) the preference run of ``cfg`` in ``out``, with its tasks and personas written into it."""
    personas, tasks = check_elicit_config(cfg)
    config = asdict(cfg) | {
        "task_ids": [t.id for t in tasks],
        "tasks_sha": _sha(json.dumps([asdict(t) for t in tasks])),
        "persona_prompts": {p.name: p.system_prompt for p in personas},
    }
    run = RunDir(out, config, overwrite=overwrite, kind=KIND)
    with atomic_open(run.file("tasks.jsonl")) as fh:
        for t in tasks:
            fh.write(json.dumps({"id": t.id, "text": t.text, "topic": t.topic, "split": t.split}) + "\n")
    with atomic_open(run.file("personas.json")) as fh:
        json.dump([asdict(p) for p in personas], fh, indent=2)
    return PrefsRun(run, cfg, tasks, personas)


def open_run(path: str | Path) -> PrefsRun:
    """Open an existing preference run directory (made by :func:`~personascope.preferences.steps.run_elicit`)."""
    root = Path(path)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise PersonascopeError(f"{root} is not a run directory (no {MANIFEST}); run `personascope prefs elicit` first")
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        raise PersonascopeError(f"{manifest} is not valid JSON") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise PersonascopeError(f"{root} is not a preference run (made by `personascope prefs elicit`)")
    config = data.get("config", {})
    run = RunDir(root, config, kind=KIND)
    fields = {k: config[k] for k in ElicitConfig.__dataclass_fields__ if k in config}
    cfg = ElicitConfig(**fields)
    tasks = load_tasks(root / "tasks.jsonl")
    personas = load_personas(root / "personas.json")
    return PrefsRun(run, cfg, tasks, personas)


# ------------------------------------------------------------------------------------------------- cached tensors


def task_activations(prefs: PrefsRun, model: Model, persona: Persona, batch_size: int = 16) -> torch.Tensor:
    """Residual activations at the last prompt token of every task's single-task prompt under ``persona``,
    ``[tasks, num_layers + 1, hidden]``, cached in ``activations-P.safetensors``."""
    from personascope.residual.capture import capture

    inputs = {
        "model_fingerprint": model.fingerprint(),
        "tasks_sha": str(prefs.run.config.get("tasks_sha", "")),
        "system_prompt_sha": _sha(persona.system_prompt),
        "reduction": "prompt_last",
    }

    def compute() -> dict[str, torch.Tensor]:
        convs = [task_conversation(t.text, persona.system_prompt) for t in prefs.tasks]
        return capture(model, convs, reductions=["prompt_last"], batch_size=batch_size)

    acts: torch.Tensor = prefs.run.cached_tensors(f"activations-{persona.name}", inputs, compute)["prompt_last"]
    return acts


def task_embeddings(prefs: PrefsRun, embed_fn: EmbedFn | None = None) -> np.ndarray:
    """Text embeddings of the run's tasks, ``[tasks, dim]`` (the shipped MiniLM unless ``embed_fn`` is given),
    cached in ``embeddings.safetensors``."""
    inputs = {"tasks_sha": str(prefs.run.config.get("tasks_sha", "")), "embedder": "custom" if embed_fn else "minilm"}

    def compute() -> dict[str, torch.Tensor]:
        fn = embed_fn
        if fn is None:
            from personascope.preferences.embed import embed_texts

            fn = embed_texts
        emb = np.asarray(fn([t.text for t in prefs.tasks]), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(prefs.tasks):
            raise PersonascopeError(f"the embedder returned shape {emb.shape} for {len(prefs.tasks)} tasks")
        return {"embeddings": torch.from_numpy(emb)}

    emb = prefs.run.cached_tensors("embeddings", inputs, compute)["embeddings"]
    return np.asarray(emb.numpy(), dtype=np.float64)


# -------------------------------------------------------------------------------------------- output formatting


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: ``—`` for a missing value or NaN, floats to ``digits`` places."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def json_safe(value: Any) -> Any:
    """JSON-safe copy: NaN becomes None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
