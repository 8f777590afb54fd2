from __future__ import annotations

import pytest
from torch import nn

from personascope.errors import PersonascopeError
from personascope.models.layers import find_decoder_layers
from personascope.testing import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_finds_its_blocks(family: str) -> None:
    m = tiny_model(family, num_layers=2)
    assert m.num_layers == 2
    assert m.hidden_size == 32
    assert isinstance(m.layers, nn.ModuleList)


def test_peft_wrapped_model_finds_the_same_blocks() -> None:
    from peft import LoraConfig, get_peft_model

    m = tiny_model("llama")
    wrapped = get_peft_model(m.hf_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert find_decoder_layers(wrapped) is m.layers


def test_override_path_and_its_errors() -> None:
    m = tiny_model("llama")
    assert find_decoder_layers(m.hf_model, "model.layers") is m.layers
    with pytest.raises(PersonascopeError, match=r"does not name an nn\.ModuleList"):
        find_decoder_layers(m.hf_model, "model.norm")


def test_unknown_architecture_lists_what_was_found() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stack = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    with pytest.raises(PersonascopeError, match=r"module lists found: stack \(3\)") as info:
        find_decoder_layers(Odd())
    assert "\n" not in str(info.value)
    assert find_decoder_layers(Odd(), "stack") is not None
