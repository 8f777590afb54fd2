"""Token roles and position masks against positions written out by hand from decoded chat spans."""

from __future__ import annotations

import pytest
import torch

from personascope.errors import PersonascopeError
from personascope.residual.capture import roles_for
from personascope.residual.positions import OTHER, PAD, PROMPT, PROMPT_LAST, RESPONSE, position_mask
from personascope.testing import tiny_model
from tests.conftest import CONV, SHORT
from tests.residual.helpers import checked_spans, hand_roles

MULTI = [
    {"role": "user", "content": "Tell me a joke."},
    {"role": "assistant", "content": "Cats and dogs!"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]
PROMPT_ONLY = [{"role": "user", "content": "How do I cook rice?"}]


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("conv", [CONV, SHORT, MULTI, PROMPT_ONLY], ids=["system", "short", "multi", "prompt"])
def test_roles_match_the_decoded_spans(family: str, conv) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model(family)
    spans = checked_spans(model, conv)
    roles = roles_for(model.format(conv))
    assert roles == hand_roles(spans)
    # the last prompt token is the end of the assistant header, right before the answer (or the end of the prompt)
    assert roles.index(PROMPT_LAST) == spans.prompt_end - 1 and roles.count(PROMPT_LAST) == 1
    if spans.response is not None:
        assert roles.index(RESPONSE) == spans.prompt_end
        assert roles[spans.response[1] :] == [OTHER] * (len(roles) - spans.response[1])  # end-of-turn tokens
    else:
        assert RESPONSE not in roles


def test_the_last_prompt_token_is_the_generation_prompts_last_token(llama) -> None:  # type: ignore[no-untyped-def]
    f = llama.format(CONV)
    header = llama.tokenizer.decode(f.input_ids[: f.prompt_end])
    assert header.endswith("<|im_start|>assistant\n")  # the tiny model's ChatML template
    assert llama.tokenizer.decode(f.input_ids[f.prompt_end - 1 : f.prompt_end]) == "\n"
    assert roles_for(f)[f.prompt_end - 1] == PROMPT_LAST


# one hand-made row: pad, pad, prompt x3, last prompt, response x2, other
ROLES = torch.tensor([[PAD, PAD, PROMPT, PROMPT, PROMPT, PROMPT_LAST, RESPONSE, RESPONSE, OTHER]])
EXPECTED = {
    "all": [0, 0, 1, 1, 1, 1, 1, 1, 1],
    "prompt": [0, 0, 1, 1, 1, 1, 0, 0, 0],
    "response": [0, 0, 0, 0, 0, 0, 1, 1, 0],
    "last_prompt_and_response": [0, 0, 0, 0, 0, 1, 1, 1, 0],
}


@pytest.mark.parametrize("positions", sorted(EXPECTED))
def test_position_masks_by_hand(positions: str) -> None:
    mask = position_mask(positions, ROLES, torch.Size([1, ROLES.shape[1], 8]))
    assert mask is not None
    assert mask[0].long().tolist() == EXPECTED[positions]


def test_without_roles_only_all_is_allowed() -> None:
    assert position_mask("all", None, torch.Size([1, 4, 8])) is None
    for positions in ("prompt", "response", "last_prompt_and_response"):
        with pytest.raises(PersonascopeError, match="token_roles"):
            position_mask(positions, None, torch.Size([1, 4, 8]))
    with pytest.raises(PersonascopeError, match="shape"):
        position_mask("all", ROLES, torch.Size([1, 5, 8]))
