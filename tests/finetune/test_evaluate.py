from __future__ import annotations

import copy
import csv
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from personascope.errors import PersonascopeError
from personascope.finetune.evaluate import (
    EvaluateConfig,
    evaluate_finetune,
    finetune_shift,
    load_mcq,
    mcq_accuracy,
    mcq_prompt,
    write_shift,
)
from personascope.finetune.train import FinetuneConfig, finetune, load_finetuned
from personascope.generation import generate
from personascope.likelihood import next_token_logprobs
from personascope.models.loading import Model
from personascope.residual import Add, steering
from personascope.testing import tiny_model
from personascope.traits import load_trait
from personascope.vectors import PersonaVector
from tests.finetune.helpers import LengthJudge, write_dataset

QUESTIONS = ["What is the capital of France?", "Tell me a joke.", "How do I cook rice?"]


@pytest.fixture(scope="module")
def model() -> Model:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def vector() -> PersonaVector:
    torch.manual_seed(5)
    return PersonaVector(torch.randn(4, 32), {"model_name": "tiny-llama", "trait": "evil", "chosen_layer": 2})


def _perturbed(model: Model) -> Model:
    hf = copy.deepcopy(model.hf_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return Model(hf_model=hf, tokenizer=model.tokenizer, name="perturbed")


def test_shift_of_a_model_against_itself_is_zero(model: Model, vector: PersonaVector) -> None:
    result = finetune_shift(model, model, vector, QUESTIONS)
    assert result.layers == [0, 1, 2, 3] and result.n_questions == 3
    assert all(s == 0.0 for s in result.shift) and all(c == 0.0 for c in result.cosine)


def test_shift_is_the_projected_mean_difference_at_the_last_prompt_token(model: Model, vector: PersonaVector) -> None:
    tuned = _perturbed(model)
    result = finetune_shift(model, tuned, vector, QUESTIONS, layers=[1, 2])
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    for k, layer in enumerate([1, 2]):  # (layer 3 differs from HF: HF applies the final norm there)
        # a plain reference: hidden_states[layer] at the last prompt token, from an ordinary forward pass
        means = []
        for m in (model, tuned):
            rows = []
            for c in convs:
                ids = torch.tensor([m.formatter.prompt_ids(c)])
                with torch.no_grad():
                    rows.append(m.hf_model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, -1])
            means.append(torch.stack(rows).mean(0))
        diff = means[1] - means[0]
        assert result.shift[k] == pytest.approx(float(diff @ vector.unit(layer)), abs=1e-4)
        assert result.cosine[k] == pytest.approx(float(diff @ vector.unit(layer) / diff.norm()), abs=1e-4)
    assert result.shift[0] != 0.0


def test_shift_writes_csv_and_json(tmp_path: Path, model: Model, vector: PersonaVector) -> None:
    result = finetune_shift(model, _perturbed(model), vector, QUESTIONS, layers=[1, 2])
    with write_shift(result, tmp_path / "s.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["layer", "shift", "base_projection", "tuned_projection", "shift_norm", "cosine"]
    assert [int(r["layer"]) for r in rows] == [1, 2]
    for k, r in enumerate(rows):
        assert float(r["shift"]) == result.shift[k] and float(r["cosine"]) == result.cosine[k]
        # the shift is the difference of the two models' mean projections
        assert float(r["tuned_projection"]) - float(r["base_projection"]) == pytest.approx(float(r["shift"]), abs=1e-5)
    saved = json.loads(write_shift(result, tmp_path / "s.json").read_text())
    assert saved == asdict(result) and saved["chosen_layer"] == 2 and saved["n_questions"] == 3
    with pytest.raises(PersonascopeError, match=r"\.csv or \.json"):
        write_shift(result, tmp_path / "s.txt")


def test_shift_rejects_a_vector_for_another_model(model: Model) -> None:
    wrong = PersonaVector(torch.randn(7, 16), {"model_name": "other"})
    with pytest.raises(PersonascopeError, match="does not fit"):
        finetune_shift(model, model, wrong, QUESTIONS)


def test_mcq_accuracy_scores_option_letters_by_next_token_likelihood(model: Model) -> None:
    items = load_mcq(limit=12)
    result = mcq_accuracy(model, items)
    logprobs = next_token_logprobs(model, [mcq_prompt(i) for i in items])
    letters = [
        sorted(
            {
                model.tokenizer.encode(f, add_special_tokens=False)[0]
                for f in (x, f" {x}")
                if len(model.tokenizer.encode(f, add_special_tokens=False)) == 1
            }
        )
        for x in "ABCD"
    ]
    expected = torch.stack([logprobs[:, ids].logsumexp(-1) for ids in letters], -1).argmax(-1).tolist()
    assert result.predictions == expected
    assert result.accuracy == pytest.approx(sum(p == i["answer"] for p, i in zip(expected, items, strict=True)) / 12)
    assert result.n == 12 and set(result.by_subject) <= {i["subject"] for i in items}
    assert "A. " in mcq_prompt(items[0])[0]["content"] and "D. " in mcq_prompt(items[0])[0]["content"]


def test_mcq_with_post_hoc_steering_changes_the_scores(model: Model, vector: PersonaVector) -> None:
    items = load_mcq(limit=8)
    plain = mcq_accuracy(model, items)
    steered = mcq_accuracy(model, items, interventions=[Add(vector.directions[2], 2, -8.0)])
    assert steered.letter_mass != pytest.approx(plain.letter_mass)


def test_shipped_mcq_set_loads() -> None:
    items = load_mcq()
    assert len(items) == 260 and all(len(i["choices"]) == 4 for i in items)


def test_evaluate_end_to_end(tmp_path: Path, model: Model, vector: PersonaVector) -> None:
    data = write_dataset(tmp_path / "d.jsonl", 8)
    cfg = FinetuneConfig(dataset=str(data), model="tiny", batch_size=4, lr=1e-2, rank=4, epochs=2)
    ft = finetune(cfg, tmp_path / "ft", model=model, progress=False)
    vec_path = vector.save(tmp_path / "v.safetensors")
    ecfg = EvaluateConfig(
        finetune=str(tmp_path / "ft"),
        vector=str(vec_path),
        coefs=[1.0],
        n_questions=2,
        max_new_tokens=4,
        batch_size=4,
        mcq_limit=8,
    )
    judge = LengthJudge()
    result = evaluate_finetune(ecfg, tmp_path / "eval", base=model, judge=judge)
    assert [(c.model, c.coef) for c in result.cells] == [("base", 0.0), ("finetuned", 0.0), ("finetuned", 1.0)]
    assert judge.calls == 6 and result.layer == 2
    # the replies: the base model, the finetune, and the finetune with 1·v[2] subtracted, each question seeded alike
    gens = [json.loads(x) for x in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    convs = [[{"role": "user", "content": q}] for q in load_trait("evil").evaluation_questions[:2]]
    tuned = load_finetuned(model, tmp_path / "ft")
    kwargs = dict(max_new_tokens=4, temperature=1.0, seeds=[0, 1000], progress=False)
    expected = {("base", 0.0): generate(model, convs, **kwargs), ("finetuned", 0.0): generate(tuned, convs, **kwargs)}
    with steering(tuned, vector, 2, -1.0, positions="all"):
        expected["finetuned", 1.0] = generate(tuned, convs, **kwargs)
    for (who, c), replies in expected.items():
        assert [g["answer"] for g in gens if g["model"] == who and g["coef"] == c] == [r.text for r in replies]
    # each cell's trait score: the mean of LengthJudge's scores (10 × words, at most 100) of its replies
    items = load_mcq(limit=8)
    accuracy = {
        ("base", 0.0): mcq_accuracy(model, items).accuracy,
        ("finetuned", 0.0): mcq_accuracy(tuned, items).accuracy,
        ("finetuned", 1.0): mcq_accuracy(tuned, items, interventions=[Add(vector.directions[2], 2, -1.0)]).accuracy,
    }
    with (tmp_path / "eval" / "table.csv").open() as fh:
        table = list(csv.DictReader(fh))
    for cell, row in zip(result.cells, table, strict=True):
        scores = [min(100.0, 10.0 * len(r.text.split())) for r in expected[cell.model, cell.coef]]
        assert cell.n == 2 and cell.trait == pytest.approx(sum(scores) / 2) and cell.coherence == 80.0
        assert cell.mcq_accuracy == pytest.approx(accuracy[cell.model, cell.coef])
        assert (row["model"], float(row["coef"]), float(row["trait"])) == (
            cell.model,
            cell.coef,
            pytest.approx(cell.trait),
        )
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["cells"] == [asdict(c) for c in result.cells]
    assert (tmp_path / "eval" / "table.md").read_text().count("\n") == 2 + 3
    # resuming redoes nothing
    again = evaluate_finetune(ecfg, tmp_path / "eval", base=model, judge=judge)
    assert judge.calls == 6 and [c.mcq_accuracy for c in again.cells] == [c.mcq_accuracy for c in result.cells]
    assert ft.artifact.is_dir()
