"""Judge validation: how well a judge separates the labelled answers of the built-in traits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from personascope.judges.base import Judge, JudgeItem, JudgeResult
from personascope.traits import builtin_traits, load_labelled, load_trait

__all__ = ["validate_judge"]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def validate_judge(judge: Judge, traits: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Score each trait's labelled set with ``judge`` and measure the separation.

    ``traits`` defaults to all built-in traits. Returns one row per trait with: ``trait``, ``judge`` (its id),
    ``n`` (labelled answers), ``n_pos``/``n_neg`` (label 1/0), ``n_scored`` (items with a score), ``n_unscored``
    (no score, dropped), ``n_errors`` (results with an error, dropped), ``auroc`` (of the trait scores against
    the labels over scored items; ``None`` unless both classes have a score), ``mean_pos``/``mean_neg`` (mean trait
    score per class) and ``coherence_mean``/``coherence_scored`` (mean coherence score over all labelled answers, a
    sanity check: they are all written to be coherent).
    """
    from sklearn.metrics import roc_auc_score

    names = list(builtin_traits()) if traits is None else list(traits)
    rows: list[dict[str, Any]] = []
    for name in names:
        spec = load_trait(name)
        labelled = load_labelled(name)
        items = [JudgeItem(a.question, a.answer) for a in labelled]
        results = judge.trait_scores(spec, items) if items else []
        coherence = judge.coherence_scores(items) if items else []
        errors = sum(1 for r in results if r.error is not None)
        scored = [(r.score, a.label) for r, a in zip(results, labelled, strict=True) if _usable(r)]
        labels = [label for _, label in scored]
        scores = [float(s) for s, _ in scored if s is not None]
        auroc = float(roc_auc_score(labels, scores)) if len(set(labels)) == 2 else None
        coherent = [float(r.score) for r in coherence if _usable(r) and r.score is not None]
        rows.append(
            {
                "trait": name,
                "judge": judge.id,
                "n": len(labelled),
                "n_pos": sum(1 for a in labelled if a.label == 1),
                "n_neg": sum(1 for a in labelled if a.label == 0),
                "n_scored": len(scored),
                "n_unscored": len(results) - len(scored) - errors,
                "n_errors": errors,
                "auroc": auroc,
                "mean_pos": _mean([float(s) for s, lab in scored if s is not None and lab == 1]),
                "mean_neg": _mean([float(s) for s, lab in scored if s is not None and lab == 0]),
                "coherence_mean": _mean(coherent),
                "coherence_scored": len(coherent),
            }
        )
    return rows


def _usable(result: JudgeResult) -> bool:
    return result.error is None and result.score is not None and math.isfinite(result.score)
