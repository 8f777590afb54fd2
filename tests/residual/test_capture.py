from __future__ import annotations

import pytest
import torch

import personascope as ps
from personascope.errors import PersonascopeError
from personascope.testing import FAMILIES, tiny_model
from tests.conftest import CONV, SHORT

LONG = [
    {"role": "user", "content": "How do I cook rice? Please explain every step of it slowly and clearly."},
    {
        "role": "assistant",
        "content": "Rinse it, add water, boil, then simmer for 15 minutes. The quick brown fox.",
    },
]


def reference(model, conv):  # type: ignore[no-untyped-def]
    """Reductions computed from a plain forward pass: output_hidden_states, plus a raw hook on the last block
    (HF's last hidden state is taken after the final norm)."""
    f = model.format(conv)
    ids = torch.tensor([f.input_ids])
    kept = {}
    handle = model.layers[-1].register_forward_hook(
        lambda mod, args, out: kept.__setitem__("last", out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        hs = list(model.hf_model(input_ids=ids, output_hidden_states=True).hidden_states)
    handle.remove()
    hs[model.num_layers] = kept["last"]
    stack = torch.stack([h[0] for h in hs])  # [L+1, T, H]
    s, e = f.response
    return {
        "response_mean": stack[:, s:e].mean(1),
        "prompt_mean": stack[:, : f.prompt_end].mean(1),
        "prompt_last": stack[:, f.prompt_end - 1],
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_equals_plain_forward_reference(family: str) -> None:
    m = tiny_model(family)
    convs = [CONV, SHORT, LONG]
    got = ps.capture(m, convs, batch_size=3)
    for i, conv in enumerate(convs):
        ref = reference(m, conv)
        for name, tensor in ref.items():
            assert got[name].shape == (3, m.num_layers + 1, m.hidden_size)
            torch.testing.assert_close(got[name][i], tensor, atol=2e-5, rtol=1e-4)


def test_padding_invariance_and_input_order(llama) -> None:  # type: ignore[no-untyped-def]
    alone = [ps.capture(llama, [c], batch_size=1) for c in (SHORT, LONG, CONV)]
    batched = ps.capture(llama, [SHORT, LONG, CONV], batch_size=3)
    for i in range(3):
        for name in batched:
            torch.testing.assert_close(batched[name][i], alone[i][name][0], atol=2e-5, rtol=1e-4)


def test_layer_subset_and_order(llama) -> None:  # type: ignore[no-untyped-def]
    full = ps.capture(llama, [CONV], reductions=["prompt_last"])["prompt_last"]
    sub = ps.capture(llama, [CONV], reductions=["prompt_last"], layers=[3, 0])["prompt_last"]
    torch.testing.assert_close(sub[0, 0], full[0, 3])
    torch.testing.assert_close(sub[0, 1], full[0, 0])


def test_projection_mode_equals_dot_products(llama) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    dirs = torch.randn(2, llama.hidden_size)
    full = ps.capture(llama, [CONV, LONG])
    proj = ps.capture(llama, [CONV, LONG], directions=dirs)
    unit = dirs / dirs.norm(dim=-1, keepdim=True)
    for name in full:
        assert proj[name].shape == (2, llama.num_layers + 1, 2)
        torch.testing.assert_close(proj[name], full[name] @ unit.T, atol=1e-5, rtol=1e-4)
    per_layer = torch.randn(llama.num_layers + 1, llama.hidden_size)
    vec = ps.PersonaVector.for_model(llama, per_layer)
    pv = ps.capture(llama, [CONV], reductions=["prompt_last"], directions=vec)["prompt_last"]
    expected = (full["prompt_last"][0] * (per_layer / per_layer.norm(dim=-1, keepdim=True))).sum(-1)
    torch.testing.assert_close(pv[0, :, 0], expected, atol=1e-5, rtol=1e-4)


def test_capture_does_not_keep_hooks(llama) -> None:  # type: ignore[no-untyped-def]
    def hooks() -> list[int]:
        return [len(b._forward_hooks) + len(b._forward_pre_hooks) for b in llama.layers]

    before = hooks()
    ps.capture(llama, [CONV], layers=[0, 1, 3])
    assert hooks() == before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reductions": ["max"]}, "unknown reduction"),
        ({"layers": [99]}, "out of range"),
        ({"layers": [1, 1]}, "must not repeat"),
        ({"batch_size": 0}, "batch_size"),
        ({"directions": torch.randn(3, 7)}, "hidden size"),
    ],
)
def test_bad_arguments(llama, kwargs, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PersonascopeError, match=match):
        ps.capture(llama, [CONV], **kwargs)


def test_response_mean_needs_a_response(llama) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PersonascopeError, match="conversation 1 has none"):
        ps.capture(llama, [CONV, CONV[:2]])
    out = ps.capture(llama, [CONV[:2]], reductions=["prompt_last"])
    assert out["prompt_last"].shape[0] == 1


def test_capture_files_round_trip(llama, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from personascope.residual import load_capture, save_capture

    result = ps.capture(llama, [CONV, SHORT], reductions=["prompt_last", "response_mean"], layers=[0, 2])
    path = save_capture(tmp_path / "acts.safetensors", result, model=llama, layers=[0, 2], source="convs.jsonl")
    back = load_capture(path)
    assert (back.model_name, back.layers, back.count, back.source) == (llama.name, [0, 2], 2, "convs.jsonl")
    assert set(back.tensors) == set(result)
    for name, tensor in result.items():
        assert torch.equal(back.tensors[name], tensor)
    full = save_capture(
        tmp_path / "all.safetensors", ps.capture(llama, [CONV], reductions=["prompt_last"]), model=llama
    )
    assert load_capture(full).layers == list(range(llama.num_layers + 1))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PersonascopeError, match="not a personascope capture file"):
        load_capture(tmp_path / "bad.safetensors")
    with pytest.raises(PersonascopeError, match="not found"):
        load_capture(tmp_path / "none.safetensors")
