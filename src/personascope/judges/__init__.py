"""Judges: score rollouts for trait expression and coherence (0-100).

:func:`make_judge` builds one from a spec string:

- ``"none"``: no scores (:class:`NoJudge`);
- ``"contrast:MODEL"``: offline contrast-likelihood judge on a local model (:class:`ContrastJudge`, the default);
- ``"hf:MODEL"``: the paper's logprob judge on a local chat model (:class:`HFLogprobJudge`);
- ``"openai:MODEL"``: the logprob judge on an OpenAI-compatible server (:mod:`personascope.judges.openai`).

``MODEL`` is a bundled alias, a model directory or a hub id (see :func:`personascope.load_model`). Scores are
cached in SQLite (:class:`JudgeCache`) unless ``cache=False``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from personascope.errors import PersonascopeError
from personascope.judges.base import COHERENCE_RUBRIC, Judge, JudgeItem, JudgeResult, logprob_score
from personascope.judges.cache import CachedJudge, JudgeCache, cache_key
from personascope.judges.local import ContrastJudge, HFLogprobJudge, NoJudge, assert_unsteered, likelihood_coherence
from personascope.judges.validate import validate_judge

if TYPE_CHECKING:
    from personascope.models.loading import Model

__all__ = [
    "COHERENCE_RUBRIC",
    "JUDGE_FORMS",
    "CachedJudge",
    "ContrastJudge",
    "HFLogprobJudge",
    "Judge",
    "JudgeCache",
    "JudgeItem",
    "JudgeResult",
    "NoJudge",
    "assert_unsteered",
    "cache_key",
    "default_cache_path",
    "likelihood_coherence",
    "logprob_score",
    "make_judge",
    "validate_judge",
]

#: The judge spec forms :func:`make_judge` accepts.
JUDGE_FORMS = ("none", "contrast:MODEL", "hf:MODEL", "openai:MODEL")


def default_cache_path() -> Path:
    """``judge_cache.sqlite`` in the personascope cache folder (see :func:`personascope.models.cache_dir`)."""
    from personascope.models import cache_dir

    return cache_dir() / "judge_cache.sqlite"


def make_judge(
    spec: str,
    *,
    model: Model | None = None,
    cache: str | Path | bool | None = True,
) -> Judge:
    """Build a judge from ``spec`` (see the module docstring for the forms).

    ``model`` is reused for ``contrast:``/``hf:`` when ``model.name == MODEL``, so one loaded model can generate
    and judge (judging always runs unsteered). ``cache``: ``True`` for the default file
    (:func:`default_cache_path`), a path for another file, ``False``/``None`` for no cache. ``"none"`` is never
    cached.
    """
    kind, sep, name = spec.strip().partition(":")
    kind, name = kind.strip().lower(), name.strip()
    if kind == "none" and not sep:
        return NoJudge()
    if not sep or not name or kind not in ("contrast", "hf", "openai"):
        raise PersonascopeError(f"unknown judge spec {spec!r}; use one of: {', '.join(JUDGE_FORMS)}")
    judge: Judge
    if kind == "openai":
        from personascope.judges.openai import OpenAIJudge

        judge = OpenAIJudge(name)
    else:
        if model is not None and model.name == name:
            local = model
        else:
            from personascope.models.loading import load_model

            local = load_model(name)
        judge = ContrastJudge(local, name) if kind == "contrast" else HFLogprobJudge(local, name)
    if cache is True:
        return CachedJudge(judge, JudgeCache(default_cache_path()))
    if cache is False or cache is None:
        return judge
    return CachedJudge(judge, JudgeCache(cache))
