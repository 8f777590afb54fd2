"""Judges: score rollouts for trait expression and coherence."""

from personascope.judges.base import COHERENCE_RUBRIC, Judge, JudgeItem, JudgeResult, logprob_score

__all__ = ["COHERENCE_RUBRIC", "Judge", "JudgeItem", "JudgeResult", "logprob_score"]
