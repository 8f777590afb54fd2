"""Pieces the pipelines share: chunked, resumable generation and judging into a run directory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from personascope.generation import generate
from personascope.residual.interventions import Intervention

if TYPE_CHECKING:
    from personascope.judges import Judge
    from personascope.models.loading import Model
    from personascope.runs import RunDir
    from personascope.traits import TraitSpec


@dataclass(frozen=True)
class Job:
    """One reply to sample: a stable key, the prompt conversation, and fields copied into the record."""

    key: str
    conversation: list[dict[str, str]]
    fields: dict[str, Any]
    coef: float = 0.0  # per-row steering coefficient, used when the chunk steers
    seed: int | None = None  # sampling seed; default: the run's seed plus the job's position


def build_judge(spec: str, model: Model) -> Judge:
    """The judge for ``spec``, reusing ``model`` when the judge runs on the same model."""
    from personascope.judges import make_judge

    return make_judge(spec, model=model)


def run_generation(
    run: RunDir,
    name: str,
    model: Model,
    jobs: Sequence[Job],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    batch_size: int,
    chunk: int = 32,
    steer: Callable[[torch.Tensor], list[Intervention]] | None = None,
    desc: str = "rollouts",
) -> list[dict[str, Any]]:
    """Generate every job not yet in ``NAME.jsonl`` and append its record; returns all records in job order.

    Job ``g`` samples with its own seed (``job.seed``, default ``seed + g``) whatever the chunking, so a resumed run
    reproduces what an uninterrupted one would have written. ``steer(coefs)`` builds the interventions for a
    chunk from its per-row coefficients (one batch can hold a whole coefficient sweep).
    """
    done = run.done_keys(name)
    with tqdm(total=len(jobs), initial=sum(j.key in done for j in jobs), desc=desc, unit="reply") as bar:
        for start in range(0, len(jobs), chunk):
            # only the jobs of this chunk not yet on disk (a resumed or extended run generates nothing twice)
            todo = [(start + i, j) for i, j in enumerate(jobs[start : start + chunk]) if j.key not in done]
            if not todo:
                continue
            interventions = steer(torch.tensor([j.coef for _, j in todo])) if steer is not None else []
            gens = generate(
                model,
                [j.conversation for _, j in todo],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seeds=[j.seed if j.seed is not None else seed + g for g, j in todo],
                interventions=interventions,
                batch_size=batch_size,
                progress=False,
            )
            fresh = [
                {
                    "key": job.key,
                    **job.fields,
                    "answer": gen.text,
                    "n_tokens": len(gen.response_ids),
                    "finished": gen.finished,
                }
                for (_, job), gen in zip(todo, gens, strict=True)
            ]
            run.append(name, fresh)
            done.update(r["key"] for r in fresh)
            bar.update(len(fresh))
    by_key = {r["key"]: r for r in run.records(name)}
    return [by_key[j.key] for j in jobs]


def run_judging(
    run: RunDir,
    name: str,
    judge: Judge,
    trait: TraitSpec,
    records: Sequence[dict[str, Any]],
    *,
    chunk: int = 64,
    desc: str = "judging",
) -> dict[str, dict[str, Any]]:
    """Trait and coherence scores for every record not yet in ``NAME.jsonl``; returns ``{key: score record}``."""
    from personascope.judges import JudgeItem

    done = run.done_keys(name)
    pending = [r for r in records if r["key"] not in done]
    with tqdm(total=len(records), initial=len(records) - len(pending), desc=desc, unit="reply") as bar:
        for start in range(0, len(pending), chunk):
            part = pending[start : start + chunk]
            items = [JudgeItem(r["question"], r["answer"]) for r in part]
            trait_results = judge.trait_scores(trait, items)
            coherence_results = judge.coherence_scores(items)
            run.append(
                name,
                [
                    {
                        "key": r["key"],
                        "trait": t.score,
                        "coherence": c.score,
                        "error": t.error or c.error,
                    }
                    for r, t, c in zip(part, trait_results, coherence_results, strict=True)
                ],
            )
            bar.update(len(part))
    wanted = {r["key"] for r in records}
    return {s["key"]: s for s in run.records(name) if s["key"] in wanted}
