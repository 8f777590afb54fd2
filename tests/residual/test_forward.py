"""The one forward-pass assembly: padding by hand, logits against a plain call, peft wrappers, roles and caches."""

from __future__ import annotations

import pytest
import torch

import personascope as ps
from personascope.models.loading import Model
from personascope.residual.forward import attention_mask, cache_name, forward, output_cache, pad
from personascope.residual.positions import PAD, PROMPT, PROMPT_LAST, RESPONSE
from personascope.testing import tiny_model

SEQS = [[5, 6, 7, 8], [9, 10]]
ROLES = [[PROMPT, PROMPT, PROMPT_LAST, RESPONSE], [PROMPT, PROMPT_LAST]]


def test_pad_right_and_left_by_hand() -> None:
    ids, roles = pad(SEQS, ROLES, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert roles.tolist() == [[PROMPT, PROMPT, PROMPT_LAST, RESPONSE], [PROMPT, PROMPT_LAST, PAD, PAD]]
    ids, roles = pad(SEQS, ROLES, pad_id=0, left=True)
    assert ids.tolist() == [[5, 6, 7, 8], [0, 0, 9, 10]]
    assert roles.tolist() == [[PROMPT, PROMPT, PROMPT_LAST, RESPONSE], [PAD, PAD, PROMPT, PROMPT_LAST]]
    assert attention_mask(roles).tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]


def _peft(model: Model) -> Model:
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(model.hf_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    return Model(hf_model=wrapped, tokenizer=model.tokenizer, name=model.name + "+lora", layers_path=model.layers_path)


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "peft"])
def test_logits_match_a_plain_call_and_keep_last_trims(wrap: bool) -> None:
    base = tiny_model("llama")
    m = _peft(base) if wrap else base
    assert m.forward_accepts("logits_to_keep")  # seen through the peft wrapper too
    ids, roles = pad(SEQS, ROLES, int(m.tokenizer.pad_token_id))
    with torch.no_grad():
        full, offset = forward(m, ids, roles)
        ref = m.hf_model(input_ids=ids, attention_mask=attention_mask(roles)).logits
        last2, offset2 = forward(m, ids, roles, keep_last=2)
    assert offset == 0 and torch.equal(full.logits, ref)
    assert offset2 == 2 and last2.logits.shape[1] == 2
    torch.testing.assert_close(last2.logits, ref[:, 2:], atol=1e-6, rtol=1e-6)


def test_roles_and_rows_reach_the_interventions(llama) -> None:  # type: ignore[no-untyped-def]
    ids, roles = pad(SEQS, ROLES, int(llama.tokenizer.pad_token_id))
    v = torch.randn(llama.hidden_size) * 5
    coefs = torch.tensor([0.0, 1.0, 2.0])  # indexed by row: batch row b is input rows[b]
    seen = {}

    def spy(mod, args, kwargs):  # type: ignore[no-untyped-def]
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = llama.layers[2].register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            forward(llama, ids, roles)
            plain = seen["h"]
            with ps.intervene(llama, [ps.Add(v, 2, coefs, "response")]):
                forward(llama, ids, roles, rows=[2, 1])
            steered = seen["h"]
    finally:
        handle.remove()
    delta = steered - plain
    torch.testing.assert_close(delta[0, 3], 2.0 * v, atol=1e-5, rtol=1e-5)  # row 0 is input 2, its response token
    assert torch.equal(delta[0, :3], torch.zeros_like(delta[0, :3])) and torch.equal(
        delta[1], torch.zeros_like(delta[1])
    )


def test_a_cached_step_equals_the_full_pass(llama) -> None:  # type: ignore[no-untyped-def]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    roles = torch.tensor([[PROMPT, PROMPT, PROMPT, PROMPT_LAST, RESPONSE]])
    with torch.no_grad():
        first, _ = forward(llama, ids[:, :4], roles[:, :4], use_cache=True)
        step, _ = forward(
            llama,
            ids[:, 4:],
            roles[:, 4:],
            mask=torch.ones(1, 5, dtype=torch.long),
            use_cache=True,
            cache=output_cache(llama, first),
            position_ids=torch.tensor([[4]]),
        )
        full, _ = forward(llama, ids, roles)
    assert cache_name(llama) in ("cache", "past_key_values")
    torch.testing.assert_close(step.logits[0, -1], full.logits[0, -1], atol=1e-5, rtol=1e-5)
