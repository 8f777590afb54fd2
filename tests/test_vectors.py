from __future__ import annotations

from pathlib import Path

import pytest
import torch

from personascope.errors import PersonascopeError
from personascope.vectors import PersonaVector


def test_round_trip_keeps_directions_and_metadata(tmp_path: Path, llama) -> None:  # type: ignore[no-untyped-def]
    d = torch.randn(llama.num_layers + 1, llama.hidden_size)
    v = PersonaVector.for_model(llama, d, trait="evil", method="response_mean", chosen_layer=2, source_run="r1")
    path = v.save(tmp_path / "sub" / "evil.safetensors")
    back = PersonaVector.load(path)
    assert torch.equal(back.directions, d)
    assert back.metadata == v.metadata
    assert back.trait == "evil" and back.chosen_layer == 2
    back.check_compatible(llama)
    assert not list(path.parent.glob(".*tmp"))


def test_file_is_plain_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    path = PersonaVector(torch.ones(3, 4), {"model_name": "x"}).save(tmp_path / "v.safetensors")
    assert set(load_file(str(path))) == {"directions"}


def test_mismatch_is_a_clear_error(llama) -> None:  # type: ignore[no-untyped-def]
    wrong = PersonaVector(torch.zeros(llama.num_layers + 1, 16), {"model_name": "other"})
    with pytest.raises(PersonascopeError, match="does not fit tiny-llama"):
        wrong.check_compatible(llama)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(PersonascopeError, match="not found"):
        PersonaVector.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    with pytest.raises(PersonascopeError, match="not a readable safetensors"):
        PersonaVector.load(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"weights": torch.zeros(2)}, str(other))
    with pytest.raises(PersonascopeError, match="not a personascope vector"):
        PersonaVector.load(other)


def test_shape_checks() -> None:
    with pytest.raises(PersonascopeError, match="2-D"):
        PersonaVector(torch.zeros(4))
    with pytest.raises(PersonascopeError, match="num_layers"):
        PersonaVector(torch.zeros(4, 3), {"num_layers": 7})
