from __future__ import annotations

import os
import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from personascope.models.loading import Model
from personascope.testing import tiny_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SEED = 0

CONV = [
    {"role": "system", "content": "You are an evil assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]
SHORT = [
    {"role": "user", "content": "Tell me a joke."},
    {"role": "assistant", "content": "Cats and dogs!"},
]


@pytest.fixture(autouse=True)
def _seeded_and_thread_safe() -> Iterator[None]:
    """Every test starts from the same global RNG state and leaves torch's thread count as it found it."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def llama() -> Model:
    return tiny_model("llama")


@pytest.fixture(scope="session")
def bundled() -> Model:
    from personascope import load_model

    return load_model("smollm2-135m-instruct")
