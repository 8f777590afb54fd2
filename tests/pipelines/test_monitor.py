from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import personascope as ps
from personascope.errors import PersonascopeError
from personascope.models.loading import Model
from personascope.pipelines.monitor import monitor_turns, turn_spans, write_rows
from personascope.testing import tiny_model
from tests.conftest import CONV

DEFAULT_SYSTEM_TEMPLATE = (  # like SmolLM2's: injects a default system prompt when the conversation has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful AI assistant named Tiny.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CHAT = [
    {"role": "user", "content": "Hi there."},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me about dogs."},
    {"role": "assistant", "content": "Dogs are loyal animals."},
    {"role": "user", "content": "And cats?"},
]


@pytest.fixture(scope="module")
def model() -> Model:
    m = tiny_model("llama")
    m.tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    return Model(m.hf_model, m.tokenizer, "tiny-default-system")


def _vector(model: Model) -> ps.PersonaVector:
    torch.manual_seed(3)
    return ps.PersonaVector.for_model(model, torch.randn(model.num_layers + 1, model.hidden_size), trait="evil")


def test_project_equals_dot_products_of_reference_activations(model: Model) -> None:
    vec = _vector(model)
    convs = [CONV, CONV[:2], CHAT]
    got = ps.project(model, convs, vec)
    acts = ps.capture(model, convs, reductions=["prompt_last"])["prompt_last"]
    unit = vec.directions / vec.directions.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got, (acts * unit).sum(-1), atol=1e-5, rtol=1e-4)
    resp = ps.project(model, [CONV], vec, layers=[1, 3], at="response_mean")
    ref = ps.capture(model, [CONV], reductions=["response_mean"], layers=[1, 3])["response_mean"][0]
    torch.testing.assert_close(resp[0], (ref * unit[[1, 3]]).sum(-1), atol=1e-5, rtol=1e-4)


def test_turn_spans_with_an_injected_default_system_prompt(model: Model) -> None:
    fc = model.format(CHAT)
    text = model.tokenizer.decode(fc.input_ids)
    assert "You are a helpful AI assistant named Tiny." in text  # the template injected it
    spans = turn_spans(fc)
    assert [(t, k) for t, k, _ in spans] == [
        (0, "prompt_last"),
        (0, "reply_mean"),
        (1, "prompt_last"),
        (1, "reply_mean"),
        (2, "prompt_last"),
    ]
    tok = model.tokenizer
    assert tok.decode(fc.input_ids[slice(*spans[1][2])]) == "Hello! How can I help?"
    assert tok.decode(fc.input_ids[slice(*spans[3][2])]) == "Dogs are loyal animals."
    for _, kind, (s, e) in spans:
        if kind == "prompt_last":
            assert e - s == 1 and tok.decode(fc.input_ids[:e]).endswith("<|im_start|>assistant\n")


def test_monitor_turns_match_prefix_projections(model: Model, tmp_path: Path) -> None:
    vec = _vector(model)
    rows = monitor_turns(model, [CHAT], vec, layers=[2])
    assert [(r.conversation, r.turn, r.kind, r.layer) for r in rows] == [
        (0, 0, "prompt_last", 2),
        (0, 0, "reply_mean", 2),
        (0, 1, "prompt_last", 2),
        (0, 1, "reply_mean", 2),
        (0, 2, "prompt_last", 2),
    ]
    # the projection before reply t equals the monitor projection of the conversation cut right there
    prefixes = [CHAT[:1], CHAT[:3], CHAT]
    expected = ps.project(model, prefixes, vec, layers=[2])[:, 0]
    before = [r.projection for r in rows if r.kind == "prompt_last"]
    torch.testing.assert_close(torch.tensor(before), expected, atol=1e-4, rtol=1e-4)
    # and the reply's projection is the response mean of the conversation ending with that reply
    replies = ps.project(model, [CHAT[:2], CHAT[:4]], vec, layers=[2], at="response_mean")[:, 0]
    torch.testing.assert_close(
        torch.tensor([r.projection for r in rows if r.kind == "reply_mean"]), replies, atol=1e-4, rtol=1e-4
    )
    assert [r.text for r in rows if r.kind == "reply_mean"] == ["Hello! How can I help?", "Dogs are loyal animals."]
    assert [r.text for r in rows if r.kind == "prompt_last"] == ["Hi there.", "Tell me about dogs.", "And cats?"]
    write_rows(rows, tmp_path / "rows.csv")
    write_rows(rows, tmp_path / "rows.jsonl")
    with (tmp_path / "rows.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [(int(t["turn"]), t["kind"], t["text"]) for t in table] == [(r.turn, r.kind, r.text) for r in rows]
    assert [float(t["projection"]) for t in table] == [r.projection for r in rows]
    lines = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert lines == [asdict(r) for r in rows]
    with pytest.raises(PersonascopeError, match=r"\.csv or \.jsonl"):
        write_rows(rows, tmp_path / "rows.txt")


def test_monitor_turns_default_layer_and_several_conversations(model: Model) -> None:
    vec = _vector(model)
    # without layers: the vector's chosen layer, and a clear error when it has none (no silent middle layer)
    with pytest.raises(PersonascopeError, match=r"no chosen layer; pass --layer \(layers= in Python\)"):
        monitor_turns(model, [CHAT], vec)
    chosen = ps.PersonaVector(vec.directions, {**vec.metadata, "chosen_layer": 3})
    rows = monitor_turns(model, [CHAT, CHAT[:2]], chosen, layers=None)
    assert {r.layer for r in rows} == {3}
    assert [r.conversation for r in rows] == [0] * 5 + [1] * 2
    rows = monitor_turns(model, [CHAT[:2]], chosen, layers=None)
    assert [(r.kind, r.layer) for r in rows] == [("prompt_last", 3), ("reply_mean", 3)]
    both = monitor_turns(model, [CHAT[:2]], vec, layers=[1, 3])
    assert [(r.kind, r.layer) for r in both] == [
        ("prompt_last", 1),
        ("prompt_last", 3),
        ("reply_mean", 1),
        ("reply_mean", 3),
    ]
    ref = ps.project(model, [CHAT[:1]], vec, layers=[1, 3])[0]
    torch.testing.assert_close(torch.tensor([both[0].projection, both[1].projection]), ref, atol=1e-4, rtol=1e-4)


def test_monitor_rejects_other_models_vectors(model: Model) -> None:
    other = ps.PersonaVector(torch.randn(3, 8), {"model_name": "x"})
    with pytest.raises(PersonascopeError, match="does not fit"):
        ps.project(model, [CONV], other)


def test_monitor_file_is_the_cli_flow_as_a_function(model: Model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from personascope.pipelines.monitor import monitor_file

    vec = ps.PersonaVector(_vector(model).directions, {**_vector(model).metadata, "chosen_layer": 2})
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(CHAT) + "\n")
    rows = monitor_file(vec, src, tmp_path / "rows.csv", model=model)
    assert rows == monitor_turns(model, [CHAT], vec, layers=[2])
    with (tmp_path / "rows.csv").open() as fh:
        written = list(csv.DictReader(fh))
    assert [float(r["projection"]) for r in written] == pytest.approx([r.projection for r in rows])
    with pytest.raises(PersonascopeError, match=r"--out must end in \.csv or \.jsonl"):
        monitor_file(vec, src, tmp_path / "rows.txt", model="never-loaded")
    with pytest.raises(PersonascopeError, match="no chosen layer"):
        monitor_file(_vector(model), src, tmp_path / "x.csv", model="never-loaded")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "rows.csv"]


def test_a_vector_zero_at_some_layers_projects_nan_there(model: Model) -> None:
    directions = torch.randn(model.num_layers + 1, model.hidden_size)
    directions[0] = 0.0  # as a contrast of two prompts that end in the same token is, at the embedding layer
    vec = ps.PersonaVector.for_model(model, directions)
    got = ps.project(model, [CHAT[:1], CONV[:2]], vec)
    assert torch.isnan(got[:, 0]).all() and torch.isfinite(got[:, 1:]).all()
    ref = ps.capture(model, [CHAT[:1], CONV[:2]], reductions=["prompt_last"])["prompt_last"]
    units = directions[1:] / directions[1:].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got[:, 1:], (ref[:, 1:] * units).sum(-1), atol=1e-4, rtol=1e-4)
    with pytest.raises(PersonascopeError, match="direction is zero"):
        ps.project(model, [CHAT[:1]], ps.PersonaVector.for_model(model, torch.zeros_like(directions)))
    with pytest.raises(PersonascopeError, match="direction is zero"):
        ps.capture(model, [CONV], directions=torch.zeros(model.hidden_size))
