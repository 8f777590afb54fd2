"""TokenSpans: interventions on explicit per-conversation token spans touch exactly those tokens."""

from __future__ import annotations

import pytest
import torch

import personascope as ps
from personascope.errors import PersonascopeError
from personascope.likelihood import next_token_logprobs
from personascope.residual import TokenSpans, capture_spans
from personascope.residual.capture import roles_for
from personascope.residual.positions import PAD

LONG = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Task A: tell me a joke about cats. Task B: cook rice for dinner."},
]
SHORT = [{"role": "user", "content": "Task A: a joke. Task B: the capital of France."}]


def read_residual(model, layer, ids, roles, rows=None):  # type: ignore[no-untyped-def]
    """The residual at ``layer`` as block ``layer`` receives it (a pre-hook independent of the engine)."""
    seen = {}

    def pre(mod, args, kwargs):  # type: ignore[no-untyped-def]
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad(), ps.token_roles(model, roles, rows):
            model.hf_model(input_ids=ids, attention_mask=(roles != PAD).long())
    finally:
        handle.remove()
    return seen["h"]


def pack(model, convs, left: bool):  # type: ignore[no-untyped-def]
    """A padded batch (left or right) with engine roles; also each row's offset of its first real token."""
    formatted = [model.format(c) for c in convs]
    width = max(len(f) for f in formatted)
    ids = torch.zeros(len(convs), width, dtype=torch.long)
    roles = torch.full((len(convs), width), PAD, dtype=torch.long)
    offsets = []
    for b, f in enumerate(formatted):
        off = width - len(f) if left else 0
        ids[b, off : off + len(f)] = torch.tensor(f.input_ids)
        roles[b, off : off + len(f)] = torch.tensor(roles_for(f))
        offsets.append(off)
    return ids, roles, offsets


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("layer", [0, 2])
def test_differential_add_touches_exactly_the_spans(llama, left, layer) -> None:  # type: ignore[no-untyped-def]
    convs = [LONG, SHORT]
    ids, roles, offsets = pack(llama, convs, left)
    n_tokens = [len(llama.format(c)) for c in convs]
    plus = [[(3, 6), (8, 9)], [(2, 4)]]
    minus = [[(10, 13)], []]
    v = torch.randn(llama.hidden_size)
    rows = torch.tensor([1, 0])  # batch row 0 is conversation 1 and vice versa: spans follow the rows
    flipped = [plus[1], plus[0]], [minus[1], minus[0]]
    interventions = [
        ps.Add(v, layer, 2.0, positions=TokenSpans(flipped[0])),
        ps.Add(v, layer, -2.0, positions=TokenSpans(flipped[1])),
    ]
    before = read_residual(llama, layer, ids, roles, rows)
    with ps.intervene(llama, interventions):
        after = read_residual(llama, layer, ids, roles, rows)
    for b in range(2):
        conv = int(rows[b])
        for t in range(ids.shape[1]):
            k = t - offsets[b]  # the token's index within its conversation
            inside_plus = any(s <= k < e for s, e in flipped[0][conv]) and 0 <= k < n_tokens[b]
            inside_minus = any(s <= k < e for s, e in flipped[1][conv]) and 0 <= k < n_tokens[b]
            delta = after[b, t] - before[b, t]
            if inside_plus:
                torch.testing.assert_close(delta, 2.0 * v, atol=1e-5, rtol=1e-5)
            elif inside_minus:
                torch.testing.assert_close(delta, -2.0 * v, atol=1e-5, rtol=1e-5)
            else:
                assert torch.equal(after[b, t], before[b, t]), (b, t)


def test_spans_through_capture_follow_length_sorting_and_per_row_coefs(llama) -> None:  # type: ignore[no-untyped-def]
    convs = [SHORT, LONG, SHORT]
    singles = [[(k, k + 1) for k in range(0, 8)] for _ in convs]  # one span per token: capture reads each one
    v = torch.randn(llama.hidden_size)
    steer = [[(2, 4)], [(5, 7)], [(0, 1)]]
    coefs = torch.tensor([1.0, -3.0, 0.5])
    base = capture_spans(llama, convs, singles, layers=[1], batch_size=2)
    with ps.intervene(llama, [ps.Add(v, 1, coefs, positions=TokenSpans(steer))]):
        got = capture_spans(llama, convs, singles, layers=[1], batch_size=2)
    for i in range(len(convs)):
        for k in range(8):
            delta = got[i, k, 0] - base[i, k, 0]
            if any(s <= k < e for s, e in steer[i]):
                torch.testing.assert_close(delta, float(coefs[i]) * v, atol=1e-4, rtol=1e-4)
            else:
                assert delta.abs().max() < 1e-5, (i, k)


def test_next_token_logprobs_with_spans_equals_one_by_one(llama) -> None:  # type: ignore[no-untyped-def]
    convs = [LONG, SHORT]
    spans = [[(4, 9)], [(3, 5)]]
    v = torch.randn(llama.hidden_size) * 3
    with ps.intervene(llama, [ps.Add(v, 2, 1.0, positions=TokenSpans(spans))]):
        together = next_token_logprobs(llama, convs, batch_size=2)
    for i, conv in enumerate(convs):
        with ps.intervene(llama, [ps.Add(v, 2, 1.0, positions=TokenSpans([spans[i]]))]):
            alone = next_token_logprobs(llama, [conv])
        torch.testing.assert_close(together[i], alone[0], atol=1e-4, rtol=1e-4)
    plain = next_token_logprobs(llama, convs)
    assert (together - plain).abs().max() > 1e-3


def test_generation_with_spans_is_the_same_cached_or_not(llama) -> None:  # type: ignore[no-untyped-def]
    convs = [LONG, SHORT]  # different lengths: left padding in the batch
    spans = TokenSpans([[(4, 9)], [(3, 5)]])
    v = torch.randn(llama.hidden_size) * 3
    kwargs = dict(max_new_tokens=5, temperature=0.0, interventions=[ps.Add(v, 1, 1.0, positions=spans)])
    cached = ps.generate(llama, convs, **kwargs)  # type: ignore[arg-type]
    full = ps.generate(llama, convs, use_cache=False, **kwargs)  # type: ignore[arg-type]
    assert [g.response_ids for g in cached] == [g.response_ids for g in full]
    one = ps.generate(
        llama,
        [SHORT],
        max_new_tokens=5,
        temperature=0.0,
        interventions=[ps.Add(v, 1, 1.0, positions=TokenSpans([[(3, 5)]]))],
    )
    assert one[0].response_ids == cached[1].response_ids


@pytest.mark.parametrize(
    ("spans", "match"),
    [
        ([], "non-empty"),
        ([[(3, 3)]], "start < end"),
        ([[(-1, 2)]], "start < end"),
        ([[(1, 2, 3)]], "integers"),
        ([[(1.0, 2.0)]], "integers"),
        ([[(True, 2)]], "integers"),
        ([[5]], "integers"),
        (["ab"], "list of"),
    ],
)
def test_malformed_spans(spans, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PersonascopeError, match=match):
        TokenSpans(spans)


def test_spans_accept_numpy_integers_and_empty_rows() -> None:
    import numpy as np

    spans = TokenSpans([[(np.int64(2), np.int32(5))], []])
    assert spans.spans == (((2, 5),), ()) and len(spans) == 2


def test_spans_outside_the_prompt_or_call_are_clear_errors(llama) -> None:  # type: ignore[no-untyped-def]
    v = torch.randn(llama.hidden_size)
    n = len(llama.format(SHORT))
    with (
        ps.intervene(llama, [ps.Add(v, 1, positions=TokenSpans([[(0, n + 1)]]))]),
        pytest.raises(PersonascopeError, match="prompt has only"),
    ):
        next_token_logprobs(llama, [SHORT])
    with (
        ps.intervene(llama, [ps.Add(v, 1, positions=TokenSpans([[(0, 1)]]))]),
        pytest.raises(PersonascopeError, match="covers 1 conversations"),
    ):
        next_token_logprobs(llama, [SHORT, SHORT])
    ids = torch.tensor([llama.format(SHORT).input_ids])
    with (
        ps.intervene(llama, [ps.Add(v, 1, positions=TokenSpans([[(0, 1)]]))]),
        pytest.raises(PersonascopeError, match="token_roles"),
    ):
        llama.hf_model(input_ids=ids)
