from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from personascope.errors import PersonascopeError
from personascope.finetune.datasets import tokenize_example
from personascope.finetune.train import (
    FinetuneConfig,
    _prepare,
    finetune,
    forward_loss,
    load_finetuned,
    read_finetune_manifest,
    training_interventions,
)
from personascope.models.loading import Model
from personascope.residual.hooks import add_site_hook
from personascope.testing import tiny_model
from personascope.vectors import PersonaVector
from tests.finetune.helpers import CONV, chat_rows, write_dataset

LAYER = 2


@pytest.fixture(scope="module")
def model() -> Model:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def vector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    vec = PersonaVector(torch.randn(4, 32), {"model_name": "tiny-llama", "trait": "evil", "chosen_layer": LAYER})
    return vec.save(tmp_path_factory.mktemp("vec") / "evil.safetensors")


def _lora_model(base: Model) -> Model:
    import copy

    hf = _prepare(FinetuneConfig(dataset="-").resolved(), copy.deepcopy(base.hf_model))
    return Model(hf_model=hf, tokenizer=base.tokenizer, name="lora")


def _batch(m: Model) -> list:  # type: ignore[type-arg]
    return [tokenize_example(m, CONV), tokenize_example(m, chat_rows(1)[0]["messages"])]  # type: ignore[arg-type]


def _record(m: Model, batch: list, interventions: list) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[type-arg]
    """The residual stream at LAYER as the rest of the network sees it (after any intervention), and the loss."""
    seen: list[torch.Tensor] = []
    handle = add_site_hook(m, LAYER, lambda h: seen.append(h.detach().clone()))  # type: ignore[func-returns-value]
    try:
        loss, _ = forward_loss(m, batch, interventions)
    finally:
        handle.remove()
    return seen[0], loss


def test_preventative_steering_adds_exactly_coef_v_during_the_training_forward(model: Model) -> None:
    m = _lora_model(model)
    batch = _batch(m)
    v = torch.randn(32)
    plain, loss_plain = _record(m, batch, [])
    steered, loss_steered = _record(m, batch, training_interventions(m, steer=v, layer=LAYER, coef=3.0))
    real = torch.zeros(plain.shape[:2], dtype=torch.bool)
    for b, ex in enumerate(batch):
        real[b, : len(ex.input_ids)] = True
    assert torch.allclose(steered[real] - plain[real], 3.0 * v.expand(int(real.sum()), -1), atol=1e-5)
    assert torch.equal(steered[~real], plain[~real])  # padding is left alone
    assert float(loss_plain.detach()) != float(loss_steered.detach())
    # the gradient flows through the steered stream to the LoRA weights
    loss_steered.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.hf_model.named_parameters() if "lora" in n)
    # and no hook outlives the forward pass
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in m.layers)


def test_caft_removes_the_component_during_training(model: Model) -> None:
    m = _lora_model(model)
    batch = _batch(m)
    v = torch.randn(32)
    u = v / v.norm()
    plain, _ = _record(m, batch, [])
    ablated, _ = _record(m, batch, training_interventions(m, ablate=v, layer=LAYER))
    real = torch.zeros(plain.shape[:2], dtype=torch.bool)
    for b, ex in enumerate(batch):
        real[b, : len(ex.input_ids)] = True
    assert (plain[real] @ u).abs().max() > 0.1
    assert (ablated[real] @ u).abs().max() < 1e-4
    # only the component along u changed
    expected = plain[real] - (plain[real] @ u).unsqueeze(-1) * u
    assert torch.allclose(ablated[real], expected, atol=1e-5)


def _cfg(dataset: Path, **kw: object) -> FinetuneConfig:
    base: dict[str, object] = {"dataset": str(dataset), "model": "tiny", "batch_size": 4, "lr": 5e-3, "rank": 4}
    base.update(kw)
    return FinetuneConfig(**base)  # type: ignore[arg-type]


def test_lora_finetune_end_to_end(tmp_path: Path, model: Model) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 8)
    result = finetune(_cfg(data, epochs=4, lr=2e-2), tmp_path / "run", model=model, progress=False)
    assert result.steps == 8 and len(result.losses) == 8
    assert sum(result.losses[-2:]) < sum(result.losses[:2])
    names = sorted(p.name for p in result.artifact.iterdir())
    assert "adapter_model.safetensors" in names and "personascope.json" in names
    manifest = read_finetune_manifest(tmp_path / "run")
    assert manifest["kind"] == "lora" and manifest["base_fingerprint"] == model.fingerprint()
    assert manifest["steer"] is None and manifest["steps"] == 8
    assert not list((tmp_path / "run").rglob("*.pt")) and not list((tmp_path / "run").rglob("*.bin"))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    # the passed-in model is untouched
    assert "lora" not in " ".join(n for n, _ in model.hf_model.named_parameters())
    # the loaded finetune (merged or not) computes what the trained model computes
    ids = torch.tensor([tokenize_example(model, CONV).input_ids])
    with torch.no_grad():
        trained = result.model.hf_model(input_ids=ids).logits
        merged = load_finetuned(model, tmp_path / "run").hf_model(input_ids=ids).logits
        unmerged = load_finetuned(model, result.artifact, merge=False).hf_model(input_ids=ids).logits
        base = model.hf_model(input_ids=ids).logits
    assert torch.allclose(trained, unmerged, atol=1e-5) and torch.allclose(trained, merged, atol=1e-4)
    assert not torch.allclose(trained, base, atol=1e-3)
    # finishing again just loads the result
    again = finetune(_cfg(data, epochs=4, lr=2e-2), tmp_path / "run", model=model, progress=False)
    assert again.steps == 8 and again.losses == result.losses


def test_steering_is_used_in_training_and_absent_at_inference(tmp_path: Path, model: Model, vector: Path) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 8)
    plain = finetune(_cfg(data, epochs=1), tmp_path / "plain", model=model, progress=False)
    steered = finetune(
        _cfg(data, epochs=1, steer=str(vector), coef=4.0), tmp_path / "steer", model=model, progress=False
    )
    manifest = read_finetune_manifest(steered.artifact)
    assert manifest["steer"] == {"vector": str(vector), "layer": LAYER, "coef": 4.0, "positions": "all"}
    assert steered.losses[0] != plain.losses[0]  # the training forward pass was steered
    a = load_file(str(plain.artifact / "adapter_model.safetensors"))
    b = load_file(str(steered.artifact / "adapter_model.safetensors"))
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    # at inference the model runs unsteered: no hooks, and the same output as the saved adapter loaded afresh
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in steered.model.layers)
    ids = torch.tensor([tokenize_example(model, CONV).input_ids])
    with torch.no_grad():
        out = steered.model.hf_model(input_ids=ids).logits
        fresh = load_finetuned(model, steered.artifact, merge=False).hf_model(input_ids=ids).logits
    assert torch.allclose(out, fresh, atol=1e-6)


def test_caft_finetune_records_the_ablation(tmp_path: Path, model: Model, vector: Path) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 4)
    result = finetune(_cfg(data, ablate=str(vector)), tmp_path / "run", model=model, progress=False)
    manifest = read_finetune_manifest(result.artifact)
    assert manifest["ablate"] == {"vector": str(vector), "layer": LAYER, "positions": "all"}
    assert manifest["steer"] is None
    # the training forward pass ran with the direction ablated: its loss differs from a plain run's on the same batch
    plain = finetune(_cfg(data), tmp_path / "plain", model=model, progress=False)
    assert result.steps == plain.steps == 1 and result.losses[0] != pytest.approx(plain.losses[0], abs=1e-6)


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path: Path, model: Model) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 12)
    cfg = _cfg(data, epochs=2, checkpoint_every=2, dropout=0.1)
    straight = finetune(cfg, tmp_path / "a", model=model, progress=False)
    partial = finetune(cfg, tmp_path / "b", model=model, stop_after=3, progress=False)
    assert partial.steps == 3
    checkpoint = next((tmp_path / "b" / "checkpoints").iterdir())
    assert checkpoint.name == "step-000003"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["optimizer.safetensors", "params.safetensors", "state.json"]
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 3
    resumed = finetune(cfg, tmp_path / "b", model=model, progress=False)
    assert resumed.resumed_from == 3 and resumed.steps == straight.steps == 6
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    a = load_file(str(straight.artifact / "adapter_model.safetensors"))
    b = load_file(str(resumed.artifact / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the recorded training time runs on across the resume: it never restarts from zero
    seconds = [json.loads(line)["seconds"] for line in (tmp_path / "b" / "loss.jsonl").read_text().splitlines()]
    assert seconds == sorted(seconds) and seconds[0] > 0
    manifest = read_finetune_manifest(tmp_path / "b")
    assert manifest["train_seconds"] >= seconds[-1] > seconds[2]


def test_full_finetune(tmp_path: Path, model: Model) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 4)
    result = finetune(_cfg(data, method="full", lr=1e-3), tmp_path / "run", model=model, progress=False)
    assert (result.artifact / "model.safetensors").is_file() and (result.artifact / "tokenizer.json").is_file()
    tuned = load_finetuned(model, tmp_path / "run")
    ids = torch.tensor([tokenize_example(model, CONV).input_ids])
    with torch.no_grad():
        logits = tuned.hf_model(input_ids=ids).logits
        assert torch.allclose(logits, result.model.hf_model(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(logits, model.hf_model(input_ids=ids).logits, atol=1e-4)  # the weights moved
    assert read_finetune_manifest(tmp_path / "run")["kind"] == "full"


def test_adapter_for_another_base_model_is_a_clear_error(tmp_path: Path, model: Model) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 4)
    finetune(_cfg(data), tmp_path / "run", model=model, progress=False)
    with pytest.raises(PersonascopeError, match="fingerprint") as info:
        load_finetuned(tiny_model("llama", seed=1), tmp_path / "run")
    assert "\n" not in str(info.value)
    with pytest.raises(PersonascopeError, match="not a personascope finetune"):
        load_finetuned(model, tmp_path)


def test_bad_configs(tmp_path: Path, model: Model, vector: Path) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 4)
    wrong = PersonaVector(torch.randn(7, 16), {"model_name": "other"}).save(tmp_path / "wrong.safetensors")
    with pytest.raises(PersonascopeError, match="does not fit"):
        finetune(_cfg(data, steer=str(wrong), coef=1.0), tmp_path / "r1", model=model)
    with pytest.raises(PersonascopeError, match="not both"):
        finetune(_cfg(data, steer=str(vector), ablate=str(vector)), tmp_path / "r2", model=model)
    with pytest.raises(PersonascopeError, match="out of range"):
        finetune(_cfg(data, steer=str(vector), layer=9), tmp_path / "r3", model=model)
    with pytest.raises(PersonascopeError, match="unknown method"):
        finetune(_cfg(data, method="qlora"), tmp_path / "r4", model=model)
    with pytest.raises(PersonascopeError, match="target"):
        finetune(_cfg(data, target_modules="no_such_proj"), tmp_path / "r5", model=model)


@pytest.mark.slow
def test_short_finetune_on_the_bundled_model(tmp_path: Path, bundled: Model) -> None:
    from personascope.finetune.datasets import BuildConfig, build_dataset

    data = build_dataset(BuildConfig(trait="arithmetic", level="II", n=8), tmp_path / "data").dataset
    cfg = FinetuneConfig(dataset=str(data), batch_size=4, lr=1e-3, max_length=96)
    result = finetune(cfg, tmp_path / "run", model=bundled, progress=False)
    assert result.steps == 2 and all(0 < loss < 20 for loss in result.losses)
    tuned = load_finetuned(bundled, tmp_path / "run")
    assert tuned.num_layers == bundled.num_layers
