from __future__ import annotations

import pytest
import torch

import personascope as ps
from personascope.errors import PersonascopeError
from personascope.testing import tiny_model

PROMPTS = [
    [{"role": "user", "content": "Tell me a joke about cats."}],
    [
        {"role": "system", "content": "You are evil."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    [{"role": "user", "content": "Hi"}],
]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("positions", ["all", "response", "last_prompt_and_response", "prompt"])
def test_steered_generation_with_cache_equals_recomputation(family: str, positions: str) -> None:
    m = tiny_model(family)
    v = torch.randn(m.hidden_size) * 2
    steer = [ps.Add(v, 2, 1.5, positions)]  # type: ignore[arg-type]
    cached = ps.generate(m, PROMPTS, max_new_tokens=8, temperature=0, interventions=steer, batch_size=3)
    full = ps.generate(m, PROMPTS, max_new_tokens=8, temperature=0, interventions=steer, batch_size=3, use_cache=False)
    assert [g.response_ids for g in cached] == [g.response_ids for g in full]


def test_steering_changes_the_output(llama) -> None:  # type: ignore[no-untyped-def]
    plain = ps.generate(llama, PROMPTS, max_new_tokens=8, temperature=0)
    v = torch.randn(llama.hidden_size) * 5
    steered = ps.generate(llama, PROMPTS, max_new_tokens=8, temperature=0, interventions=[ps.Add(v, 1, 4.0)])
    assert [g.response_ids for g in plain] != [g.response_ids for g in steered]


def test_results_do_not_depend_on_batching(llama) -> None:  # type: ignore[no-untyped-def]
    for temperature in (0.0, 1.0):
        together = ps.generate(llama, PROMPTS, max_new_tokens=10, temperature=temperature, seed=7, batch_size=3)
        alone = [
            ps.generate(llama, [p], max_new_tokens=10, temperature=temperature, seed=7 + i)[0]
            for i, p in enumerate(PROMPTS)
        ]
        assert [g.response_ids for g in together] == [g.response_ids for g in alone]


def test_seed_reproducibility_and_variation(llama) -> None:  # type: ignore[no-untyped-def]
    a = ps.generate(llama, PROMPTS, max_new_tokens=10, temperature=1.0, seed=1)
    b = ps.generate(llama, PROMPTS, max_new_tokens=10, temperature=1.0, seed=1)
    c = ps.generate(llama, PROMPTS, max_new_tokens=10, temperature=1.0, seed=2)
    assert [g.response_ids for g in a] == [g.response_ids for g in b]
    assert [g.response_ids for g in a] != [g.response_ids for g in c]


def test_per_row_coefficients_in_generation(llama) -> None:  # type: ignore[no-untyped-def]
    v = torch.randn(llama.hidden_size) * 5
    coefs = torch.tensor([0.0, 3.0, 0.0])
    swept = ps.generate(
        llama,
        [PROMPTS[0]] * 3,
        max_new_tokens=8,
        temperature=0,
        interventions=[ps.Add(v, 1, coefs)],
        batch_size=2,
    )
    plain = ps.generate(llama, [PROMPTS[0]], max_new_tokens=8, temperature=0)[0]
    strong = ps.generate(llama, [PROMPTS[0]], max_new_tokens=8, temperature=0, interventions=[ps.Add(v, 1, 3.0)])[0]
    assert swept[0].response_ids == swept[2].response_ids == plain.response_ids
    assert swept[1].response_ids == strong.response_ids


def test_generation_record_fields(llama) -> None:  # type: ignore[no-untyped-def]
    g = ps.generate(llama, [PROMPTS[1]], max_new_tokens=6, temperature=0)[0]
    assert g.prompt_ids == llama.formatter.prompt_ids(PROMPTS[1])
    assert len(g.response_ids) <= 6
    assert g.response_span == (len(g.prompt_ids), len(g.prompt_ids) + len(g.response_ids))
    assert g.as_conversation()[-1] == {"role": "assistant", "content": g.text}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_bad_generation_arguments(llama, kwargs, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PersonascopeError, match=match):
        ps.generate(llama, PROMPTS, **kwargs)


def test_cannot_generate_after_an_assistant_message(llama) -> None:  # type: ignore[no-untyped-def]
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(PersonascopeError, match="conversation 0"):
        ps.generate(llama, [conv])


def test_top_logprobs_match_a_plain_forward_pass(llama) -> None:  # type: ignore[no-untyped-def]
    plain = ps.generate(llama, PROMPTS, max_new_tokens=6, temperature=0, batch_size=3)
    gens = ps.generate(llama, PROMPTS, max_new_tokens=6, temperature=0, batch_size=3, top_logprobs=5)
    assert [g.response_ids for g in gens] == [g.response_ids for g in plain]  # same tokens as the default path
    assert all(g.logprobs is None for g in plain)
    for g in gens:
        assert g.logprobs is not None and len(g.logprobs) == len(g.response_ids)
        # reference: one full forward pass over prompt + response, log-softmax of the raw logits
        ids = torch.tensor([g.prompt_ids + g.response_ids])
        with torch.no_grad():
            logits = llama.hf_model(input_ids=ids).logits[0]
        start = len(g.prompt_ids)
        for step, (tok, lp) in enumerate(zip(g.response_ids, g.logprobs, strict=True)):
            ref = torch.log_softmax(logits[start + step - 1].float(), dim=-1)
            assert lp.token_id == tok
            assert lp.logprob == pytest.approx(float(ref[tok]), abs=1e-4)
            assert len(lp.top) == 5
            assert lp.top[0][0] == tok  # greedy: the chosen token is the most likely one
            values = [v for _, v in lp.top]
            assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
            assert values == pytest.approx(ref.topk(5).values.tolist(), abs=1e-4)


def test_logprobs_ignore_temperature(llama) -> None:  # type: ignore[no-untyped-def]
    g = ps.generate(llama, [PROMPTS[0]], max_new_tokens=4, temperature=0.5, top_p=0.9, seed=3, top_logprobs=3)[0]
    ids = torch.tensor([g.prompt_ids + g.response_ids])
    with torch.no_grad():
        logits = llama.hf_model(input_ids=ids).logits[0]
    assert g.logprobs is not None
    first = torch.log_softmax(logits[len(g.prompt_ids) - 1], dim=-1)
    assert g.logprobs[0].logprob == pytest.approx(float(first[g.response_ids[0]]), abs=1e-4)


def test_stop_strings_cut_the_reply(llama) -> None:  # type: ignore[no-untyped-def]
    full = ps.generate(llama, [PROMPTS[0]], max_new_tokens=12, temperature=0)[0]
    text = llama.tokenizer.decode(full.response_ids, skip_special_tokens=True)
    assert len(text.strip()) >= 4, "the tiny model should say something"
    needle = text.strip()[2:4]
    cut = ps.generate(llama, [PROMPTS[0]], max_new_tokens=12, temperature=0, stop=[needle, "never-there"])[0]
    assert cut.stop == needle
    assert needle not in cut.text and full.text.startswith(cut.text)
    assert len(cut.response_ids) <= len(full.response_ids)
    assert cut.response_ids == full.response_ids[: len(cut.response_ids)]
    assert full.stop is None


def test_bad_logprob_and_stop_arguments(llama) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PersonascopeError, match="top_logprobs"):
        ps.generate(llama, PROMPTS, top_logprobs=-1)
    with pytest.raises(PersonascopeError, match="stop"):
        ps.generate(llama, PROMPTS, stop=[""])


def hand_steered_logprobs(  # type: ignore[no-untyped-def]
    model, prompt_ids: list[int], response_ids: list[int], v: torch.Tensor, layer: int, coef: float, positions: str
) -> list[torch.Tensor]:
    """Per generated step, the next-token log-softmax from a full forward pass over prompt + tokens so far, with
    ``coef · v`` added by a plain forward hook written here (not the engine) to the positions chosen by hand."""
    n_prompt = len(prompt_ids)
    out = []
    for step in range(len(response_ids)):
        seq = prompt_ids + response_ids[:step]
        chosen = {
            "all": range(len(seq)),
            "prompt": range(n_prompt),
            "response": range(n_prompt, len(seq)),  # the generated tokens fed back so far
            "last_prompt_and_response": range(n_prompt - 1, len(seq)),
        }[positions]
        mask = torch.zeros(1, len(seq), 1)
        mask[0, list(chosen)] = 1.0
        delta = coef * mask * v

        def post(mod, args, output, delta=delta):  # type: ignore[no-untyped-def]
            if isinstance(output, tuple):
                return (output[0] + delta, *output[1:])
            return output + delta

        def pre(mod, args, kwargs, delta=delta):  # type: ignore[no-untyped-def]
            if args:
                return (args[0] + delta, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + delta}

        if layer == 0:
            handle = model.layers[0].register_forward_pre_hook(pre, with_kwargs=True)
        else:
            handle = model.layers[layer - 1].register_forward_hook(post)
        try:
            with torch.no_grad():
                logits = model.hf_model(input_ids=torch.tensor([seq])).logits[0, -1]
        finally:
            handle.remove()
        out.append(torch.log_softmax(logits.float(), dim=-1))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("layer", [0, 2, 3])
@pytest.mark.parametrize("positions", ["all", "prompt", "response", "last_prompt_and_response"])
def test_steered_generation_matches_a_hand_built_hook(family: str, layer: int, positions: str) -> None:
    m = tiny_model(family)
    assert m.num_layers == 3  # layer 3 is the last block's output
    v = torch.randn(m.hidden_size) * 2
    gens = ps.generate(
        m,
        PROMPTS,
        max_new_tokens=6,
        temperature=0,
        interventions=[ps.Add(v, layer, 1.5, positions)],  # type: ignore[arg-type]
        batch_size=3,  # one left-padded batch
        top_logprobs=5,
    )
    for prompt, g in zip(PROMPTS, gens, strict=True):
        # the prompt the engine generated from is the chat template's rendering with the generation prompt
        rendered = m.tokenizer.apply_chat_template(
            prompt, chat_template=m.formatter.template, tokenize=False, add_generation_prompt=True
        )
        assert g.prompt_ids == m.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert g.logprobs is not None and len(g.logprobs) == len(g.response_ids) > 0
        ref = hand_steered_logprobs(m, g.prompt_ids, g.response_ids, v, layer, 1.5, positions)
        for step, (lp, want) in enumerate(zip(g.logprobs, ref, strict=True)):
            assert lp.token_id == int(want.argmax()), f"step {step}: greedy token differs from the reference"
            assert lp.logprob == pytest.approx(float(want[lp.token_id]), abs=2e-4)
            assert [x for _, x in lp.top] == pytest.approx(want.topk(5).values.tolist(), abs=2e-4)


def test_response_steering_spares_the_last_prompt_token(llama) -> None:  # type: ignore[no-untyped-def]
    v = torch.randn(llama.hidden_size) * 5

    def run(positions: str | None) -> list[ps.Generation]:
        steer = [] if positions is None else [ps.Add(v, 1, 4.0, positions)]  # type: ignore[arg-type]
        return ps.generate(llama, PROMPTS, max_new_tokens=8, temperature=0, interventions=steer, top_logprobs=3)

    plain, response, lpr = run(None), run("response"), run("last_prompt_and_response")
    for p, r, b in zip(plain, response, lpr, strict=True):
        assert p.logprobs and r.logprobs and b.logprobs
        # the first token is predicted at the last prompt token: `response` leaves it alone, the other mode steers it
        assert [x for _, x in r.logprobs[0].top] == pytest.approx([x for _, x in p.logprobs[0].top], abs=1e-5)
        assert abs(b.logprobs[0].logprob - p.logprobs[0].logprob) > 1e-2 or b.response_ids[0] != p.response_ids[0]
    # both modes change what the model says
    assert [g.response_ids for g in response] != [g.response_ids for g in plain]
    assert [g.response_ids for g in lpr] != [g.response_ids for g in plain]
    # and `response` steering acts from the second token on: the same first token, different later steps
    assert all(r.response_ids[:1] == p.response_ids[:1] for r, p in zip(response, plain, strict=True))
