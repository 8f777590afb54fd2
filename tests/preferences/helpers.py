"""Fakes shared by the preference tests: a next-token function with planted utilities and a position bias."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from personascope.preferences.elicit import model_label_ids

_TASKS = re.compile(r"Task A: (.*?)\n\nTask B: (.*?)\n\n", re.S)


def planted_logprob_fn(utilities: Mapping[str, float], bias: float = 0.0, calls: list[int] | None = None) -> Any:
    """A stand-in for ``next_token_logprobs``: ``logit(A) − logit(B) = u(task A) − u(task B) + bias``.

    The tasks are read back from each pairwise prompt; ``calls`` (if given) collects the number of prompts per call.
    """

    def fn(model: Any, conversations: Sequence[Any], batch_size: int = 8, progress: bool | None = None) -> torch.Tensor:
        ids_a, ids_b = model_label_ids(model)
        vocab = int(model.hf_model.config.vocab_size)
        out = torch.full((len(conversations), vocab), -40.0)
        for i, conv in enumerate(conversations):
            match = _TASKS.search(conv[-1]["content"])
            assert match is not None, conv
            d = utilities[match.group(1)] - utilities[match.group(2)] + bias
            out[i, ids_a[0]] = torch.nn.functional.logsigmoid(torch.tensor(d))
            out[i, ids_b[0]] = torch.nn.functional.logsigmoid(torch.tensor(-d))
        if calls is not None:
            calls.append(len(conversations))
        return out

    return fn
