"""Finetuning: build and screen chat datasets, train (LoRA or full, optionally with preventative steering or CAFT
ablation through the engine), and measure what training did along a persona vector.

- :mod:`~personascope.finetune.datasets` — OpenAI-messages JSONL with line-numbered validation, assistant-only
  labels, trait-inducing (context distillation) and narrow-flaw dataset builders;
- :mod:`~personascope.finetune.train` — :func:`finetune`, :func:`load_finetuned`;
- :mod:`~personascope.finetune.evaluate` — :func:`finetune_shift`, :func:`mcq_accuracy`, :func:`evaluate_finetune`;
- :mod:`~personascope.finetune.screen` — :func:`screen_dataset`, :func:`projection_differences`.
"""

from personascope.finetune.datasets import (
    DOMAINS,
    LEVELS,
    BuildConfig,
    BuildResult,
    ChatExample,
    TokenizedExample,
    build_dataset,
    load_chat_jsonl,
    tokenize_example,
    write_chat_jsonl,
)
from personascope.finetune.evaluate import (
    EvaluateConfig,
    EvaluateResult,
    McqResult,
    ShiftResult,
    evaluate_finetune,
    finetune_shift,
    load_mcq,
    mcq_accuracy,
)
from personascope.finetune.screen import ScreenConfig, ScreenResult, projection_differences, screen_dataset
from personascope.finetune.train import (
    FinetuneConfig,
    FinetuneResult,
    finetune,
    forward_loss,
    load_finetuned,
    read_finetune_manifest,
    training_interventions,
)

__all__ = [
    "DOMAINS",
    "LEVELS",
    "BuildConfig",
    "BuildResult",
    "ChatExample",
    "EvaluateConfig",
    "EvaluateResult",
    "FinetuneConfig",
    "FinetuneResult",
    "McqResult",
    "ScreenConfig",
    "ScreenResult",
    "ShiftResult",
    "TokenizedExample",
    "build_dataset",
    "evaluate_finetune",
    "finetune",
    "finetune_shift",
    "forward_loss",
    "load_chat_jsonl",
    "load_finetuned",
    "load_mcq",
    "mcq_accuracy",
    "projection_differences",
    "read_finetune_manifest",
    "screen_dataset",
    "tokenize_example",
    "training_interventions",
    "write_chat_jsonl",
]
