"""Task preferences: a task pool, personas, pairwise choices fitted as Thurstonian utilities, active pair selection.

The model-free core lives here: :mod:`~personascope.preferences.tasks` (the task pool and its splits),
:mod:`~personascope.preferences.personas` (system prompts to compare), :mod:`~personascope.preferences.thurstonian`
(fitting utilities to soft pairwise choices) and :mod:`~personascope.preferences.pairs` (which pairs to ask about).
"""

from personascope.preferences.pairs import (
    ActiveStep,
    converged,
    default_budget,
    initial_pairs,
    next_pairs,
    run_active,
)
from personascope.preferences.personas import Persona, get_persona, load_personas
from personascope.preferences.tasks import SPLITS, Task, load_tasks, split_tasks, topics
from personascope.preferences.thurstonian import (
    ThurstonianFit,
    fit_thurstonian,
    fit_thurstonian_adam,
    holdout_evaluate,
    log_loss,
    pair_accuracy,
)

__all__ = [
    "SPLITS",
    "ActiveStep",
    "Persona",
    "Task",
    "ThurstonianFit",
    "converged",
    "default_budget",
    "fit_thurstonian",
    "fit_thurstonian_adam",
    "get_persona",
    "holdout_evaluate",
    "initial_pairs",
    "load_personas",
    "load_tasks",
    "log_loss",
    "next_pairs",
    "pair_accuracy",
    "run_active",
    "split_tasks",
    "topics",
]
