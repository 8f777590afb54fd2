"""Preference runs: elicit → fit → probe → personas → steer, in one resumable run directory; one module per step.

:func:`run_elicit` creates the run (:mod:`~personascope.preferences.steps.run`: the config, the task selection, the
run directory and its cached tensors): it picks the tasks, writes them (``tasks.jsonl``) and the personas
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

from personascope.preferences.steps.elicit import ElicitResult, run_elicit
from personascope.preferences.steps.fit import FitResult, load_utilities, run_fit
from personascope.preferences.steps.personas import PersonasResult, personas_table, run_personas
from personascope.preferences.steps.probe import ProbeRunResult, probe_table, run_probe
from personascope.preferences.steps.run import (
    ElicitConfig,
    EmbedFn,
    PrefsRun,
    check_elicit_config,
    create_run,
    open_run,
    select_tasks,
    task_activations,
    task_embeddings,
)
from personascope.preferences.steps.steer import (
    DEFAULT_STEER_COEFS,
    SteerResult,
    run_steer,
    steer_table,
    steering_pairs,
)

__all__ = [
    "DEFAULT_STEER_COEFS",
    "ElicitConfig",
    "ElicitResult",
    "EmbedFn",
    "FitResult",
    "PersonasResult",
    "PrefsRun",
    "ProbeRunResult",
    "SteerResult",
    "check_elicit_config",
    "create_run",
    "load_utilities",
    "open_run",
    "personas_table",
    "probe_table",
    "run_elicit",
    "run_fit",
    "run_personas",
    "run_probe",
    "run_steer",
    "select_tasks",
    "steer_table",
    "steering_pairs",
    "task_activations",
    "task_embeddings",
]
