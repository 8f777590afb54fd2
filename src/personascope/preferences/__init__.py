"""Task preferences: a task pool, personas, pairwise choices fitted as Thurstonian utilities, active pair selection.

The model-free core lives here: :mod:`~personascope.preferences.tasks` (the task pool and its splits),
:mod:`~personascope.preferences.personas` (system prompts to compare), :mod:`~personascope.preferences.thurstonian`
(fitting utilities to soft pairwise choices) and :mod:`~personascope.preferences.pairs` (which pairs to ask about).
On top of it: :mod:`~personascope.preferences.prompt` (the pairwise choice prompt and where its tasks' tokens lie),
:mod:`~personascope.preferences.elicit` (asking a model, in both orders), :mod:`~personascope.preferences.probes`
(ridge probes and baselines), :mod:`~personascope.preferences.embed` (the text-embedding baseline's model),
:mod:`~personascope.preferences.steer` (steering choices on one task's tokens) and
:mod:`~personascope.preferences.steps` (resumable runs, one module per step: elicit → fit → probe → personas →
steer; :mod:`~personascope.preferences.pipeline` keeps the same names importable).
"""

from personascope.preferences.elicit import (
    PairChoice,
    label_token_ids,
    pair_conversation,
    parse_choice,
    revealed_choices,
    stated_choices,
    task_conversation,
    task_spans,
)
from personascope.preferences.embed import TextEmbedder, embed_texts, load_embedder, pull_embedder
from personascope.preferences.pairs import (
    ActiveStep,
    converged,
    default_budget,
    initial_pairs,
    next_pairs,
    run_active,
)
from personascope.preferences.personas import Persona, get_persona, load_personas
from personascope.preferences.probes import (
    FeatureScore,
    ProbeReport,
    RidgeProbe,
    evaluate_probes,
    fit_ridge,
    pairwise_accuracy,
)
from personascope.preferences.prompt import PairPrompt, pair_prompts
from personascope.preferences.steer import SteerPoint, random_direction, steered_choice_probs, swing
from personascope.preferences.steps import (
    ElicitConfig,
    open_run,
    run_elicit,
    run_fit,
    run_personas,
    run_probe,
    run_steer,
)
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
    "ElicitConfig",
    "FeatureScore",
    "PairChoice",
    "PairPrompt",
    "Persona",
    "ProbeReport",
    "RidgeProbe",
    "SteerPoint",
    "Task",
    "TextEmbedder",
    "ThurstonianFit",
    "converged",
    "default_budget",
    "embed_texts",
    "evaluate_probes",
    "fit_ridge",
    "fit_thurstonian",
    "fit_thurstonian_adam",
    "get_persona",
    "holdout_evaluate",
    "initial_pairs",
    "label_token_ids",
    "load_embedder",
    "load_personas",
    "load_tasks",
    "log_loss",
    "next_pairs",
    "open_run",
    "pair_accuracy",
    "pair_conversation",
    "pair_prompts",
    "pairwise_accuracy",
    "parse_choice",
    "pull_embedder",
    "random_direction",
    "revealed_choices",
    "run_active",
    "run_elicit",
    "run_fit",
    "run_personas",
    "run_probe",
    "run_steer",
    "split_tasks",
    "stated_choices",
    "steered_choice_probs",
    "swing",
    "task_conversation",
    "task_spans",
    "topics",
]
