"""The ``steer`` step: steer pairwise choices with a persona's probe directions (``steer.jsonl``, resumable, and
``steer.{csv,md,json,png}``).

Pairs of held-out tasks with close utilities are steered on the first task's tokens
(:mod:`~personascope.preferences.steer`) along the probe direction at a few layers, differentially and on one task
only, with a random direction as control; the coefficients are fractions of each layer's mean residual norm (at the
last prompt token of the task prompts). Every (curve, coefficient, pair) is a record keyed by the direction's
content, so a resumed run computes only the curves it lacks.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from personascope.errors import PersonascopeError
from personascope.io import atomic_open
from personascope.preferences.elicit import LogprobFn, stated_choices
from personascope.preferences.personas import Persona
from personascope.preferences.steer import SteerPoint, random_direction, steered_choice_probs, swing
from personascope.preferences.steps.fit import load_utilities
from personascope.preferences.steps.run import PrefsRun, fmt, json_safe, open_run, task_activations
from personascope.preferences.tasks import Task
from personascope.residual.steering import chosen_layers

if TYPE_CHECKING:
    from personascope.models.loading import Model
    from personascope.vectors import PersonaVector

__all__ = ["DEFAULT_STEER_COEFS", "SteerResult", "run_steer", "steer_table", "steering_pairs"]

DEFAULT_STEER_COEFS: tuple[float, ...] = (-0.5, -0.25, 0.25, 0.5)


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


@dataclass(frozen=True)
class _Curve:
    """One steering curve: a direction (``None`` for the unsteered baseline) in one mode at one layer, over
    coefficients (fractions of the layer's mean residual norm)."""

    direction: str  # "probe", "random" or "none"
    mode: str  # "differential", "single" or "none"
    layer: int | None
    vec: torch.Tensor | None
    coefs: list[float]

    def tag(self, coef: float) -> str:
        """The part of a steering record's key that names the curve and coefficient (the direction by content)."""
        if self.vec is None:
            return "base"
        digest = hashlib.sha256(self.vec.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()[:10]
        return f"{self.direction}:{digest}|{self.mode}|{self.layer}|{coef:g}"

    def keys(self, persona: str, id_pairs: Sequence[tuple[str, str]], coef: float) -> list[str]:
        return [f"{persona}|{self.tag(coef)}|{a}|{b}" for a, b in id_pairs]


def _steer_layers(model: Model, vector: PersonaVector, layers: Sequence[int] | None, source: str) -> list[int]:
    """``layers`` (checked), or the probe's own best layer plus one third and two thirds of the way up."""
    if layers:
        return chosen_layers(model, vector, list(layers), source=source)
    chosen = chosen_layers(model, vector, None, source=source, flag="--layers")[0]
    return sorted({chosen, round(model.num_layers / 3), round(2 * model.num_layers / 3)})


def _curves(
    model: Model,
    vector: PersonaVector,
    layers: Sequence[int],
    fracs: list[float],
    single: bool,
    random_control: bool,
    seed: int,
) -> list[_Curve]:
    """The unsteered baseline, then per layer the probe (differential, one task) and the random control."""
    curves = [_Curve("none", "none", None, None, [0.0])]
    for layer in layers:
        probe_dir = vector.unit(layer)
        curves.append(_Curve("probe", "differential", layer, probe_dir, fracs))
        if single:
            curves.append(_Curve("probe", "single", layer, probe_dir, fracs))
        if random_control:
            control = random_direction(model.hidden_size, seed + layer)
            curves.append(_Curve("random", "differential", layer, control, fracs))
    return curves


def _curve_probs(
    model: Model,
    who: Persona,
    curve: _Curve,
    text_pairs: list[tuple[str, str]],
    norms: dict[int, float],
    batch_size: int,
    logprob_fn: LogprobFn | None,
) -> np.ndarray:
    """``P(choose a)``, ``[len(curve.coefs), pairs]``: the plain choice for the baseline, else steered."""
    if curve.vec is None or curve.layer is None:
        choices = stated_choices(model, text_pairs, who.system_prompt, batch_size=batch_size, logprob_fn=logprob_fn)
        return np.array([[c.p for c in choices]])
    return steered_choice_probs(
        model,
        text_pairs,
        curve.vec,
        curve.layer,
        [c * norms[curve.layer] for c in curve.coefs],
        system_prompt=who.system_prompt,
        mode=curve.mode,
        batch_size=batch_size,
        logprob_fn=logprob_fn,
    )


def _records(who: Persona, curve: _Curve, id_pairs: list[tuple[str, str]], probs: np.ndarray) -> list[dict[str, Any]]:
    out = []
    for row, c in enumerate(curve.coefs):
        for pi, (k, (a, b)) in enumerate(zip(curve.keys(who.name, id_pairs, c), id_pairs, strict=True)):
            out.append(
                {
                    "key": k,
                    "direction": curve.direction,
                    "mode": curve.mode,
                    "layer": curve.layer,
                    "coef": c,
                    "a": a,
                    "b": b,
                    "p": float(probs[row, pi]),
                }
            )
    return out


def _points(
    done: dict[str, dict[str, Any]], who: Persona, curves: list[_Curve], id_pairs: list[tuple[str, str]]
) -> list[SteerPoint]:
    """Mean ``P(choose the steered task)`` (with its 95% CI) per curve and coefficient, the baseline first."""
    from personascope.report.stats import mean_ci

    points = []
    for curve in curves:
        for c in curve.coefs:
            mean, ci, n = mean_ci([done[k]["p"] for k in curve.keys(who.name, id_pairs, c)])
            points.append(SteerPoint(curve.direction, curve.mode, curve.layer, c, mean, ci, n))
    return points


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
    """Steer pairwise choices with the persona's probe directions (module docstring)."""
    from personascope.report.prefs_plots import plot_choice_steering
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
    layer_list = _steer_layers(m, vector, layers, str(vec_path))
    acts = task_activations(prefs, m, who, batch_size)
    norms = {layer: float(acts[:, layer].norm(dim=-1).mean()) for layer in layer_list}
    index_pairs = steering_pairs(prefs.tasks, load_utilities(prefs, who.name), n_pairs, seed)
    if not index_pairs:
        raise PersonascopeError("no task pairs to steer; use more tasks")
    id_pairs = [(prefs.tasks[i].id, prefs.tasks[j].id) for i, j in index_pairs]
    text_pairs = [(prefs.tasks[i].text, prefs.tasks[j].text) for i, j in index_pairs]
    run = prefs.run
    done = {r["key"]: r for r in run.records("steer")}
    curves = _curves(m, vector, layer_list, fracs, single, random_control, seed)
    for curve in tqdm(curves, desc="choice steering", unit="curve", disable=not progress):
        if all(k in done for c in curve.coefs for k in curve.keys(who.name, id_pairs, c)):
            continue
        probs = _curve_probs(m, who, curve, text_pairs, norms, batch_size, logprob_fn)
        records = _records(who, curve, id_pairs, probs)
        run.append("steer", records)
        done.update({r["key"]: r for r in records})
    points = _points(done, who, curves, id_pairs)
    swings = [
        {
            "direction": cu.direction,
            "mode": cu.mode,
            "layer": cu.layer,
            "swing": swing(points, cu.direction, cu.mode, cu.layer),
        }
        for cu in curves
        if cu.layer is not None
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
        json.dump(json_safe(data), fh, indent=2)
    with atomic_open(prefs.run.file("steer.md")) as fh:
        fh.write(steer_table(res) + "\n")


def steer_table(res: SteerResult) -> str:
    """Markdown: P(choose the steered task) per curve and coefficient, and each curve's swing."""
    coefs = sorted({p.coef for p in res.points if p.direction != "none"})
    head = " | ".join(f"c={c:g}" for c in coefs)
    lines = [f"| direction | mode | layer | {head} | swing |", "|---|---|---|" + "---|" * (len(coefs) + 1)]
    by = {(p.direction, p.mode, p.layer, p.coef): p for p in res.points}
    for s in res.swings:
        cells = " | ".join(fmt(by[(s["direction"], s["mode"], s["layer"], c)].p) for c in coefs)
        lines.append(f"| {s['direction']} | {s['mode']} | {s['layer']} | {cells} | {fmt(s['swing'])} |")
    lines.append(f"\nunsteered P(choose the steered task) = {fmt(res.points[0].p)} over {res.points[0].n} pairs")
    return "\n".join(lines)
