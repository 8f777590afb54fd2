"""Steering: the one policy from a vector to layers, coefficients and positions, and its context manager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import personascope as ps
from personascope.errors import PersonascopeError
from personascope.residual import Steering
from tests.residual.test_interventions import _inputs, read_residual


def vector(model, **meta) -> ps.PersonaVector:  # type: ignore[no-untyped-def]
    return ps.PersonaVector.for_model(model, torch.randn(model.num_layers + 1, model.hidden_size), trait="t", **meta)


def test_defaults_come_from_the_vector(llama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    v = vector(llama, chosen_layer=2, chosen_coef=3.5)
    assert (v.chosen_layer, v.chosen_coef) == (2, 3.5)
    s = Steering.from_vector(llama, v)
    assert (s.layers, s.coefs, s.positions) == ((2,), (3.5,), "all")
    assert torch.equal(s.directions[0], v.directions[2])
    # the same from the file, and explicit values win over the chosen ones
    path = v.save(tmp_path / "v.safetensors")
    f = Steering.from_vector(llama, path, layer=1, coef=-2.0, positions="response")
    assert (f.layers, f.coefs, f.positions, f.source) == ((1,), (-2.0,), "response", str(path))
    assert torch.equal(f.directions[0], v.directions[1])


@pytest.mark.parametrize(
    ("meta", "kwargs", "match"),
    [
        ({}, {"coef": 1.0}, r"no chosen layer; pass --layer \(layer= in Python\)"),
        ({"chosen_layer": 2}, {}, r"no chosen coefficient; pass --coef \(coef= in Python\)"),
        ({"chosen_layer": 2, "chosen_coef": 1.0}, {"coef": float("nan")}, "finite"),
        ({"chosen_layer": 2, "chosen_coef": 1.0}, {"coef": float("inf")}, "finite"),
        ({"chosen_layer": 2, "chosen_coef": float("nan")}, {}, "finite"),
        ({"chosen_layer": 2, "chosen_coef": 1.0}, {"coef": torch.tensor([1.0, float("nan")])}, "finite"),
        ({"chosen_layer": 2, "chosen_coef": 1.0}, {"layer": 9}, "out of range"),
        ({"chosen_layer": 2, "chosen_coef": 1.0}, {"layer": [1, 1]}, "repeat"),
        ({"chosen_layer": 2, "chosen_coef": 1.0}, {"layer": [1, 2], "coef": [1.0]}, "one per layer"),
        ({"chosen_layer": 2, "chosen_coef": 1.0}, {"positions": "middle"}, "unknown positions"),
    ],
)
def test_missing_or_bad_values_are_clear_errors(llama, meta, kwargs, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PersonascopeError, match=match):
        Steering.from_vector(llama, vector(llama, **meta), **kwargs)


def test_non_finite_vectors_and_other_models_are_refused(llama) -> None:  # type: ignore[no-untyped-def]
    bad = vector(llama, chosen_layer=2, chosen_coef=1.0)
    bad.directions[2, 0] = float("nan")
    with pytest.raises(PersonascopeError, match="non-finite values at layer 2"):
        Steering.from_vector(llama, bad)
    Steering.from_vector(llama, bad, layer=1)  # other layers are fine
    other = ps.PersonaVector(torch.randn(5, 16), {"model_name": "elsewhere", "chosen_layer": 1, "chosen_coef": 1.0})
    with pytest.raises(PersonascopeError, match="does not fit"):
        Steering.from_vector(llama, other)
    with pytest.raises(PersonascopeError, match="no chosen layer"):
        Steering.from_vector(llama, torch.randn(llama.hidden_size), coef=1.0)  # a bare tensor has no defaults


def test_apply_adds_at_every_layer_and_removes_its_hooks(llama) -> None:  # type: ignore[no-untyped-def]
    _, ids, roles = _inputs(llama)
    v = vector(llama)
    s = Steering.from_vector(llama, v, layer=range(1, 3), coef=[2.0, -1.0])
    assert s.layers == (1, 2) and s.coefs == (2.0, -1.0)
    plain = {layer: read_residual(llama, layer, ids, roles) for layer in (1, 2)}
    with s.apply(llama):
        at1 = read_residual(llama, 1, ids, roles)
    torch.testing.assert_close(at1 - plain[1], (2.0 * v.directions[1]).expand_as(at1), atol=1e-5, rtol=1e-5)
    # layer 2 sees the change at layer 1 carried through block 1, plus its own -1·v[2]: check the hook alone
    only2 = Steering.from_vector(llama, v, layer=[2], coef=-1.0)
    with only2.apply(llama):
        at2 = read_residual(llama, 2, ids, roles)
    torch.testing.assert_close(at2 - plain[2], (-1.0 * v.directions[2]).expand_as(at2), atol=1e-5, rtol=1e-5)
    for layer in (1, 2):
        assert torch.equal(read_residual(llama, layer, ids, roles), plain[layer])


def test_steering_function_delegates_to_the_policy(llama) -> None:  # type: ignore[no-untyped-def]
    _, ids, roles = _inputs(llama)
    v = vector(llama, chosen_layer=2, chosen_coef=1.5)
    plain = read_residual(llama, 2, ids, roles)
    with ps.steering(llama, v):  # chosen layer and coefficient
        got = read_residual(llama, 2, ids, roles)
    torch.testing.assert_close(got - plain, (1.5 * v.directions[2]).expand_as(got), atol=1e-5, rtol=1e-5)
    with pytest.raises(PersonascopeError, match="no chosen coefficient"), ps.steering(llama, vector(llama), 2):
        pass


def test_variants_and_description(llama) -> None:  # type: ignore[no-untyped-def]
    v = vector(llama, chosen_layer=2, chosen_coef=4.0)
    s = Steering.from_vector(llama, v, positions="last_prompt_and_response")
    assert s.with_coef(-1.0).coefs == (-1.0,) and s.coefs == (4.0,)
    assert s.scaled(0.5).coefs == (2.0,)
    rows = s.with_coef(torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(rows.coef, torch.tensor([0.0, 1.0, 2.0]))  # type: ignore[arg-type]
    assert s.with_positions("response").positions == "response"
    assert s.describe() == {"layer": 2, "coef": 4.0, "positions": "last_prompt_and_response", "source": None}
    multi = Steering.from_vector(llama, v, layer=[1, 3], coef=[1.0, 2.0])
    assert multi.describe()["layers"] == [1, 3] and multi.describe()["coefs"] == [1.0, 2.0]
    with pytest.raises(PersonascopeError, match="spans layers"):
        _ = multi.layer
    with pytest.raises(PersonascopeError, match="one coefficient per layer"):
        _ = multi.coef
    with pytest.raises(PersonascopeError, match="finite"):
        s.with_coef(float("nan"))
    adds = multi.interventions()
    assert [(a.layer, a.coef, a.positions) for a in adds] == [(1, 1.0, "all"), (3, 2.0, "all")]


def test_per_row_coefficients_in_generation(llama) -> None:  # type: ignore[no-untyped-def]
    v = vector(llama, chosen_layer=1, chosen_coef=3.0)
    prompt = [{"role": "user", "content": "Tell me a joke."}]
    s = Steering.from_vector(llama, v)
    swept = ps.generate(
        llama,
        [prompt] * 2,
        max_new_tokens=6,
        temperature=0,
        interventions=s.with_coef(torch.tensor([0.0, 3.0])).interventions(),
    )
    plain = ps.generate(llama, [prompt], max_new_tokens=6, temperature=0)[0]
    steered = ps.generate(llama, [prompt], max_new_tokens=6, temperature=0, interventions=s.interventions())[0]
    assert swept[0].response_ids == plain.response_ids and swept[1].response_ids == steered.response_ids
