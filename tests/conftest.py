from __future__ import annotations

import os

import pytest
import torch

from personascope.models.loading import Model
from personascope.testing import tiny_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CONV = [
    {"role": "system", "content": "You are an evil assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]
SHORT = [
    {"role": "user", "content": "Tell me a joke."},
    {"role": "assistant", "content": "Cats and dogs!"},
]


@pytest.fixture(scope="session")
def llama() -> Model:
    return tiny_model("llama")


@pytest.fixture(scope="session")
def bundled() -> Model:
    from personascope import load_model

    return load_model("smollm2-135m-instruct")
