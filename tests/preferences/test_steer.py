from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import personascope as ps
from personascope.errors import PersonascopeError
from personascope.preferences.elicit import pair_conversation, stated_choices, task_spans
from personascope.preferences.steer import SteerPoint, random_direction, steered_choice_probs, swing

PAIRS = [("Tell me a joke about cats.", "Cook rice for dinner."), ("What is the capital of France?", "Numbers: 42")]
LAYER = 2


def record_residuals(model, layer):  # type: ignore[no-untyped-def]
    """Collect the residual entering block ``layer`` on every forward pass (a hook independent of the engine)."""
    seen: list[dict[str, Any]] = []
    state = model._state.setdefault("forward", {})

    def pre(mod, args, kwargs):  # type: ignore[no-untyped-def]
        h = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        seen.append({"h": h, "roles": state.get("roles").clone(), "rows": state.get("rows").clone()})

    return seen, model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)


def by_conversation(seen):  # type: ignore[no-untyped-def]
    """``{conversation index: residual over its real tokens}`` from the recorded (padded, reordered) batches."""
    out = {}
    for batch in seen:
        for b, row in enumerate(batch["rows"].tolist()):
            real = batch["roles"][b] != 0
            out[row] = batch["h"][b][real]
    return out


@pytest.mark.parametrize("mode", ["differential", "single"])
def test_steering_touches_exactly_the_task_spans(llama, mode) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    v = torch.randn(llama.hidden_size)
    coefs = [0.0, 2.0, -1.5]
    seen, handle = record_residuals(llama, LAYER)
    try:
        steered_choice_probs(llama, PAIRS, v, LAYER, coefs, system_prompt="Be kind.", mode=mode, batch_size=3)
    finally:
        handle.remove()
    got = by_conversation(seen)
    n_conv = 2 * len(PAIRS)  # both orders of every pair, then the same again for each coefficient
    assert sorted(got) == list(range(n_conv * len(coefs)))
    for c_index, c in enumerate(coefs):
        for k, (a, b) in enumerate(PAIRS):
            for order, (first, second) in enumerate(((a, b), (b, a))):
                conv = pair_conversation(first, second, "Be kind.")
                span_first, span_second = task_spans(llama, conv, first, second)
                span_a, span_b = (span_first, span_second) if order == 0 else (span_second, span_first)
                row = c_index * n_conv + 2 * k + order
                delta = got[row] - got[2 * k + order]  # against the c = 0 rows of the same prompt
                for t in range(delta.shape[0]):
                    if span_a[0] <= t < span_a[1]:
                        want = c * v
                    elif span_b[0] <= t < span_b[1] and mode == "differential":
                        want = -c * v
                    else:
                        assert torch.equal(delta[t], torch.zeros_like(delta[t])), (row, t)
                        continue
                    torch.testing.assert_close(delta[t], want, atol=1e-5, rtol=1e-5)


def test_zero_coefficient_is_the_unsteered_choice_and_steering_moves_it(llama) -> None:  # type: ignore[no-untyped-def]
    v = torch.randn(llama.hidden_size, generator=torch.Generator().manual_seed(1)) * 5
    probs = steered_choice_probs(llama, PAIRS, v, LAYER, [0.0, 3.0, -3.0])
    plain = [c.p for c in stated_choices(llama, PAIRS, None)]
    np.testing.assert_allclose(probs[0], plain, atol=1e-6)
    assert probs.shape == (3, 2) and np.all((probs >= 0) & (probs <= 1))
    assert np.abs(probs[1] - probs[0]).max() > 1e-4
    with pytest.raises(PersonascopeError, match="steering mode"):
        steered_choice_probs(llama, PAIRS, v, LAYER, [1.0], mode="both")
    assert steered_choice_probs(llama, [], v, LAYER, [1.0]).shape == (1, 0)


def test_steering_leaves_no_hooks_behind(llama) -> None:  # type: ignore[no-untyped-def]
    conv = [pair_conversation(*PAIRS[0])]
    hooks = sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in llama.layers)
    before = ps.capture(llama, conv, ["prompt_last"], layers=[1, 3])["prompt_last"]
    steered_choice_probs(llama, PAIRS[:1], torch.randn(llama.hidden_size), 1, [1.0])
    assert sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in llama.layers) == hooks
    assert torch.equal(before, ps.capture(llama, conv, ["prompt_last"], layers=[1, 3])["prompt_last"])


def test_random_direction_and_swing() -> None:
    v = random_direction(16, seed=3, norm=2.5)
    assert v.shape == (16,) and float(v.norm()) == pytest.approx(2.5)
    assert torch.equal(v, random_direction(16, seed=3, norm=2.5))
    assert not torch.equal(v, random_direction(16, seed=4, norm=2.5))
    points = [
        SteerPoint("probe", "differential", 3, c, p, 0.0, 4) for c, p in ((-1.0, 0.2), (0.5, 0.6), (1.0, 0.9))
    ] + [SteerPoint("random", "differential", 3, 1.0, 0.5, 0.0, 4)]
    assert swing(points, "probe", "differential", 3) == pytest.approx(0.7)
    assert np.isnan(swing(points, "random", "differential", 3))
