from __future__ import annotations

import pytest
import torch

import personascope as ps
from personascope.errors import PersonascopeError
from personascope.residual import TokenSpans
from personascope.residual.capture import roles_for
from personascope.testing import tiny_model
from tests.conftest import CONV
from tests.residual.helpers import checked_spans


def read_residual(model, layer, ids, roles=None, rows=None):  # type: ignore[no-untyped-def]
    """The residual at ``layer`` as the next module sees it: a forward pre-hook on block ``layer`` (or on the
    final norm for the last layer). Independent of the engine's own hooks."""
    seen = {}
    target = model.layers[layer] if layer < model.num_layers else model.hf_model.model.norm

    def pre(mod, args, kwargs):  # type: ignore[no-untyped-def]
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = target.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad(), ps.token_roles(model, roles, rows):
            model.hf_model(input_ids=ids)
    finally:
        handle.remove()
    return seen["h"]


def _inputs(model):  # type: ignore[no-untyped-def]
    f = model.format(CONV)
    return f, torch.tensor([f.input_ids]), torch.tensor([roles_for(f)])


@pytest.mark.parametrize("layer", [0, 1, 3])
@pytest.mark.parametrize("positions", ["all", "prompt", "response", "last_prompt_and_response"])
def test_add_changes_exactly_the_chosen_positions(llama, layer, positions) -> None:  # type: ignore[no-untyped-def]
    _, ids, roles = _inputs(llama)
    wanted = checked_spans(llama, CONV).expected(positions)  # from decoded spans, not from the role function
    v = torch.randn(llama.hidden_size)
    before = read_residual(llama, layer, ids, roles)
    below = read_residual(llama, layer - 1, ids, roles) if layer > 0 else None
    with ps.steering(llama, v, layer, 2.5, positions=positions):
        after = read_residual(llama, layer, ids, roles)
        below_steered = read_residual(llama, layer - 1, ids, roles) if layer > 0 else None
    changed = {t for t in range(ids.shape[1]) if not torch.equal(after[0, t], before[0, t])}
    assert changed == wanted
    for t in wanted:
        torch.testing.assert_close(after[0, t] - before[0, t], 2.5 * v, atol=1e-5, rtol=1e-5)
    if below is not None:  # the layer below is untouched while the steering is active
        assert below_steered is not None and torch.equal(below_steered, below)


def _pieces(h: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the component along unit ``u`` (a scalar) and the orthogonal complement (a vector)."""
    proj = h @ u
    return proj, h - proj.unsqueeze(-1) * u


POSITION_MODES = ["all", "prompt", "response", "last_prompt_and_response"]


@pytest.mark.parametrize("positions", POSITION_MODES)
def test_ablation_per_token(llama, positions) -> None:  # type: ignore[no-untyped-def]
    _, ids, roles = _inputs(llama)
    wanted = checked_spans(llama, CONV).expected(positions)
    v = torch.randn(llama.hidden_size) * 3
    u = v / v.norm()
    before = read_residual(llama, 2, ids, roles)[0]
    with ps.intervene(llama, [ps.Ablate(v, 2, positions=positions)]):
        after = read_residual(llama, 2, ids, roles)[0]
    proj_before, rest_before = _pieces(before, u)
    proj_after, rest_after = _pieces(after, u)
    for t in range(ids.shape[1]):
        if t in wanted:
            assert abs(float(proj_before[t])) > 1e-3  # there was something to remove
            assert abs(float(proj_after[t])) < 1e-5  # the removed component is zero
            torch.testing.assert_close(rest_after[t], rest_before[t], atol=1e-5, rtol=1e-5)  # the rest is kept
        else:
            assert torch.equal(after[t], before[t])  # untouched positions are bit-identical


@pytest.mark.parametrize("positions", POSITION_MODES)
@pytest.mark.parametrize("side", ["upper", "lower"])
def test_cap_per_token(llama, positions, side) -> None:  # type: ignore[no-untyped-def]
    _, ids, roles = _inputs(llama)
    wanted = checked_spans(llama, CONV).expected(positions)
    v = torch.randn(llama.hidden_size)
    u = v / v.norm()
    before = read_residual(llama, 2, ids, roles)[0]
    proj_before, rest_before = _pieces(before, u)
    tau = float(proj_before.median())
    with ps.intervene(llama, [ps.Cap(v, 2, tau, side, positions=positions)]):
        after = read_residual(llama, 2, ids, roles)[0]
    proj_after, rest_after = _pieces(after, u)
    clamped = 0
    for t in range(ids.shape[1]):
        if t not in wanted:
            assert torch.equal(after[t], before[t])
            continue
        p = float(proj_before[t])
        expect = min(p, tau) if side == "upper" else max(p, tau)
        clamped += expect != p
        assert float(proj_after[t]) == pytest.approx(expect, abs=1e-4)
        torch.testing.assert_close(rest_after[t], rest_before[t], atol=1e-5, rtol=1e-5)
    if positions == "all":
        assert clamped > 0  # the median threshold clamps about half the tokens


def test_ablation_on_token_spans_leaves_other_tokens_bit_identical(llama) -> None:  # type: ignore[no-untyped-def]
    _, ids, roles = _inputs(llama)
    v = torch.randn(llama.hidden_size)
    u = v / v.norm()
    before = read_residual(llama, 1, ids, roles)[0]
    with ps.intervene(llama, [ps.Ablate(v, 1, positions=TokenSpans([[(2, 5), (7, 8)]]))]):
        after = read_residual(llama, 1, ids, roles, rows=torch.tensor([0]))[0]
    for t in range(ids.shape[1]):
        if t in {2, 3, 4, 7}:
            assert abs(float(after[t] @ u)) < 1e-5
        else:
            assert torch.equal(after[t], before[t])


def test_capture_and_steering_touch_the_same_tensor(llama) -> None:  # type: ignore[no-untyped-def]
    v = torch.randn(llama.hidden_size)
    for layer in range(llama.num_layers + 1):
        base = ps.capture(llama, [CONV])
        with ps.steering(llama, v, layer, 1.5):
            steered = ps.capture(llama, [CONV])
        for name in base:
            diff = steered[name][0] - base[name][0]
            torch.testing.assert_close(diff[layer], 1.5 * v, atol=1e-4, rtol=1e-4)
            assert torch.equal(diff[:layer], torch.zeros_like(diff[:layer]))


def test_last_layer_is_before_the_final_norm(llama) -> None:  # type: ignore[no-untyped-def]
    f, ids, _ = _inputs(llama)
    captured = ps.capture(llama, [CONV], reductions=["prompt_last"], layers=[llama.num_layers])["prompt_last"]
    with torch.no_grad():
        hf_last = llama.hf_model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, f.prompt_end - 1]
        torch.testing.assert_close(llama.hf_model.model.norm(captured[0, 0]), hf_last, atol=1e-5, rtol=1e-5)


def test_ablation_leaves_no_component(llama) -> None:  # type: ignore[no-untyped-def]
    v = torch.randn(llama.hidden_size)
    with ps.intervene(llama, [ps.Ablate(v, 2)]):
        proj = ps.capture(llama, [CONV], layers=[2], directions=v)
    for name in proj:
        assert proj[name].abs().max() < 1e-4
    plain = ps.capture(llama, [CONV], layers=[2], directions=v)
    assert plain["prompt_mean"].abs().max() > 1e-2


def test_cap_clamps_the_projection(llama) -> None:  # type: ignore[no-untyped-def]
    _, ids, roles = _inputs(llama)
    v = torch.randn(llama.hidden_size)
    u = v / v.norm()
    before = read_residual(llama, 2, ids, roles)[0] @ u
    tau = float(before.median())
    with ps.intervene(llama, [ps.Cap(v, 2, tau, "upper")]):
        upper = read_residual(llama, 2, ids, roles)[0] @ u
    with ps.intervene(llama, [ps.Cap(v, 2, tau, "lower")]):
        lower = read_residual(llama, 2, ids, roles)[0] @ u
    assert (upper <= tau + 1e-4).all() and (lower >= tau - 1e-4).all()
    torch.testing.assert_close(upper, torch.minimum(before, torch.tensor(tau)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lower, torch.maximum(before, torch.tensor(tau)), atol=1e-4, rtol=1e-4)


def test_per_row_coefficients_make_a_sweep_in_one_batch(llama) -> None:  # type: ignore[no-untyped-def]
    v = torch.randn(llama.hidden_size)
    coefs = torch.tensor([0.0, 1.0, -2.0, 4.0])
    base = ps.capture(llama, [CONV], layers=[2])["prompt_last"][0, 0]
    with ps.steering(llama, v, 2, coefs):
        got = ps.capture(llama, [CONV] * 4, layers=[2], batch_size=3)["prompt_last"][:, 0]
    for i, c in enumerate(coefs.tolist()):
        torch.testing.assert_close(got[i] - base, c * v, atol=1e-4, rtol=1e-4)


def test_hooks_are_removed_on_exception_and_when_nested(llama) -> None:  # type: ignore[no-untyped-def]
    def count() -> int:  # hooks beyond those transformers keeps on the blocks itself
        return sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in llama.layers) - baseline

    baseline = 0
    baseline = count()

    v = torch.randn(llama.hidden_size)
    with pytest.raises(RuntimeError, match="boom"), ps.steering(llama, v, 1, 1.0):
        assert count() == 1
        raise RuntimeError("boom")
    assert count() == 0
    with ps.steering(llama, v, 0, 1.0), ps.intervene(llama, [ps.Ablate(v, 1), ps.Add(v, 3, 2.0)]):
        assert count() == 3
        with ps.steering(llama, v, 1, 1.0):
            assert count() == 4
        assert count() == 3
    assert count() == 0
    with pytest.raises(PersonascopeError), ps.intervene(llama, [ps.Add(v, 1), ps.Add(v, 99)]):
        pass
    assert count() == 0


def test_nested_steering_adds_up(llama) -> None:  # type: ignore[no-untyped-def]
    _, ids, _ = _inputs(llama)
    v, w = torch.randn(llama.hidden_size), torch.randn(llama.hidden_size)
    before = read_residual(llama, 2, ids)
    with ps.steering(llama, v, 2, 1.0), ps.steering(llama, w, 2, -0.5):
        after = read_residual(llama, 2, ids)
    torch.testing.assert_close(after - before, (v - 0.5 * w).expand_as(before), atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_interventions() -> None:
    m = tiny_model("llama")
    m.hf_model.train()
    _, ids, _ = _inputs(m)
    direction = torch.randn(m.hidden_size, requires_grad=True)
    with ps.steering(m, direction, 2, 3.0):
        loss = m.hf_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert direction.grad is not None and direction.grad.abs().sum() > 0
    grads = [p.grad for p in m.layers[0].parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m: ps.Add(torch.randn(7), 1), "1-D tensor of size 32"),
        (lambda m: ps.Add(torch.randn(32), 9), "out of range"),
        (lambda m: ps.Add(torch.randn(32), 1, positions="middle"), "unknown positions"),
    ],
)
def test_bad_interventions(llama, make, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PersonascopeError, match=match), ps.intervene(llama, [make(llama)]):
        pass


def test_positions_without_roles_is_a_clear_error(llama) -> None:  # type: ignore[no-untyped-def]
    _, ids, _ = _inputs(llama)
    with (
        ps.steering(llama, torch.randn(32), 1, 1.0, positions="response"),
        pytest.raises(PersonascopeError, match="token_roles"),
    ):
        llama.hf_model(input_ids=ids)


def test_vector_of_another_model_is_rejected(llama) -> None:  # type: ignore[no-untyped-def]
    other = ps.PersonaVector(torch.randn(5, 16), {"model_name": "elsewhere"})
    with pytest.raises(PersonascopeError, match="does not fit"), ps.steering(llama, other, 1, 1.0):
        pass
