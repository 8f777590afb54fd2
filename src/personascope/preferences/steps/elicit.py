"""The ``elicit`` step: create the run and elicit pairwise choices for every persona with active pair selection.

Each answered pair is appended to ``pairs.jsonl`` under the key ``persona|a|b`` as soon as its chunk is done; the
active loop (:func:`~personascope.preferences.pairs.run_active`) is deterministic, so a resumed run replays the
answers on disk and asks the model only about pairs it has not answered (the file is the cache).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from personascope.preferences.elicit import LogprobFn, PairChoice, revealed_choices, stated_choices
from personascope.preferences.pairs import ActiveStep, default_budget, run_active
from personascope.preferences.personas import Persona
from personascope.preferences.steps.run import ElicitConfig, PrefsRun, create_run
from personascope.runs import RunDir

if TYPE_CHECKING:
    from personascope.models.loading import Model

__all__ = ["ElicitResult", "run_elicit"]


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
    prefs = create_run(cfg, out, overwrite=overwrite)
    run = prefs.run
    m = prefs.load_model(model, device)
    n = len(prefs.tasks)
    budget = cfg.budget if cfg.budget is not None else default_budget(n)
    summary: dict[str, dict[str, Any]] = {}
    for persona in prefs.personas:
        step = f"elicit:{persona.name}"
        if not run.step_done(step):
            info = _elicit_persona(prefs, m, persona, budget, logprob_fn, progress)
            run.step(step, "done", **info)
        summary[persona.name] = run.manifest["steps"][step]
    return ElicitResult(run.path, n, summary, time.perf_counter() - started)


class _Judge:
    """The active loop's judge for one persona: answers from ``pairs.jsonl`` where it has them (either order), asks
    the model about the rest in chunks and appends each chunk's answers to the file."""

    def __init__(self, prefs: PrefsRun, model: Model, persona: Persona, logprob_fn: LogprobFn | None) -> None:
        self.prefs, self.model, self.persona, self.logprob_fn = prefs, model, persona, logprob_fn
        self.ids = [t.id for t in prefs.tasks]
        self.text = {t.id: t.text for t in prefs.tasks}
        self.cache: dict[tuple[str, str], float] = {
            (r["a"], r["b"]): float(r["p"]) for r in prefs.run.records("pairs") if r.get("persona") == persona.name
        }
        self.chunk = max(1, 4 * prefs.config.batch_size)
        #: how many pairs the model was asked about (not answered from the file)
        self.asked = 0

    def ask(self, batch: list[tuple[str, str]]) -> list[PairChoice]:
        cfg, persona = self.prefs.config, self.persona
        texts = [(self.text[a], self.text[b]) for a, b in batch]
        if cfg.mode == "revealed":
            return revealed_choices(
                self.model,
                texts,
                persona.system_prompt,
                samples=cfg.samples,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                seeds=[_pair_seed(persona.name, a, b, cfg.seed) for a, b in batch],
                batch_size=cfg.batch_size,
            )
        return stated_choices(
            self.model, texts, persona.system_prompt, batch_size=cfg.batch_size, logprob_fn=self.logprob_fn
        )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        ids, cache = self.ids, self.cache
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
        for start in range(0, len(todo), self.chunk):
            part = todo[start : start + self.chunk]
            names = [(ids[int(batch[k, 0])], ids[int(batch[k, 1])]) for k in part]
            records = []
            for k, (a, b), c in zip(part, names, self.ask(names), strict=True):
                out[k] = cache[(a, b)] = c.p
                records.append(self._record(a, b, c))
            self.prefs.run.append("pairs", records)
            self.asked += len(records)
        return out

    def _record(self, a: str, b: str, c: PairChoice) -> dict[str, Any]:
        name = self.persona.name
        return {
            "key": f"{name}|{a}|{b}",
            "persona": name,
            "a": a,
            "b": b,
            "p": c.p,
            "p_ab": c.p_ab,
            "p_ba": c.p_ba,
            "mass": c.mass,
        }


def _elicit_persona(
    prefs: PrefsRun, model: Model, persona: Persona, budget: int, logprob_fn: LogprobFn | None, progress: bool
) -> dict[str, Any]:
    cfg, tasks, run = prefs.config, prefs.tasks, prefs.run
    judge = _Judge(prefs, model, persona, logprob_fn)
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
        "asked_model": judge.asked,
        "mean_label_mass": float(np.mean(mass)) if mass else None,
        "position_bias": _position_bias(run, persona.name),
    }


def _position_bias(run: RunDir, persona: str) -> float | None:
    """Mean P(label A) over both orders of every pair: 0.5 without position bias."""
    recs = [r for r in run.records("pairs") if r.get("persona") == persona]
    if not recs:
        return None
    return float(np.mean([0.5 * (r["p_ab"] + r["p_ba"]) for r in recs]))
