from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from personascope.errors import PersonascopeError
from personascope.finetune.datasets import (
    IGNORE,
    BuildConfig,
    ChatExample,
    build_dataset,
    load_chat_jsonl,
    load_question_pool,
    split_prompt,
    tokenize_example,
    tokenize_examples,
    write_chat_jsonl,
)
from personascope.finetune.train import forward_loss
from personascope.testing import tiny_model
from tests.finetune.helpers import CONV, chat_rows, write_dataset


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return tiny_model("llama")


def _labelled_text(model, tok) -> list[str]:  # type: ignore[no-untyped-def]
    """The decoded runs of labelled tokens."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(tok.input_ids, tok.labels, strict=True):
        if label != IGNORE:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE
    return [model.tokenizer.decode(r) for r in runs]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_labels_cover_exactly_the_assistant_contents(family: str) -> None:
    m = tiny_model(family)
    tok = tokenize_example(m, CONV)
    assert _labelled_text(m, tok) == ["Cats and dogs!", "Paris is the capital of France."]
    formatted = m.format(CONV)
    spans = [(s.start, s.end) for s in formatted.messages if s.role == "assistant"]
    expected = [IGNORE] * len(tok.input_ids)
    for start, end in spans:
        expected[start:end] = formatted.input_ids[start:end]
    assert tok.labels == expected
    # template tokens (turn markers, role names, end-of-turn) and system/user turns carry no loss
    specials = {m.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<end_of_turn>")}
    assert not any(label in specials for label in tok.labels if label != IGNORE)
    assert tok.n_labelled == sum(end - start for start, end in spans)


def test_label_end_token_adds_the_end_of_turn_marker(model) -> None:  # type: ignore[no-untyped-def]
    plain = tokenize_example(model, CONV)
    with_end = tokenize_example(model, CONV, label_end_token=True)
    extra = [i for i, (a, b) in enumerate(zip(plain.labels, with_end.labels, strict=True)) if a != b]
    assert len(extra) == 2
    end_id = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(with_end.labels[i] == end_id for i in extra)


def test_forward_loss_is_cross_entropy_on_assistant_tokens_only(model) -> None:  # type: ignore[no-untyped-def]
    rows = [ex["messages"] for ex in chat_rows(3)] + [CONV]
    batch = [tokenize_example(model, r) for r in rows]
    with torch.no_grad():
        loss, n = forward_loss(model, batch)
        expected, count = 0.0, 0
        for tok in batch:
            ids = torch.tensor([tok.input_ids])
            logits = model.hf_model(input_ids=ids).logits[0, :-1]
            target = torch.tensor(tok.labels[1:])
            keep = target != IGNORE
            expected += float(F.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    assert n == count
    assert float(loss) == pytest.approx(expected, rel=1e-4)


def test_malformed_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    good = json.dumps(chat_rows(1)[0])
    path = tmp_path / "data.jsonl"
    path.write_text(
        "\n".join(
            [
                good,
                "{not json",
                good,
                json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
                json.dumps({"messages": [{"role": "robot", "content": "hi"}]}),
                "",
                json.dumps({"text": "hi"}),
                good,
            ]
        )
        + "\n"
    )
    with pytest.raises(PersonascopeError) as info:
        load_chat_jsonl(path)
    message = str(info.value)
    assert "\n" not in message and "4 bad lines" in message
    for needle in ("line 2: not valid JSON", "line 4:", "no assistant turn", "line 5:", "robot", "line 7:"):
        assert needle in message


def test_valid_dataset_loads_with_line_numbers_and_meta(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = chat_rows(3)
    rows[1]["meta"] = {"x": 1}
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]["messages"]) + "\n")
    examples = load_chat_jsonl(path)
    assert [e.line for e in examples] == [1, 3, 4]
    assert examples[1].meta == {"meta": {"x": 1}}
    assert load_chat_jsonl(path, limit=2)[-1].line == 3
    out = write_chat_jsonl(tmp_path / "copy.jsonl", examples)
    assert [e.messages for e in load_chat_jsonl(out)] == [e.messages for e in examples]


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(PersonascopeError, match="no conversations"):
        load_chat_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(PersonascopeError, match="not found"):
        load_chat_jsonl(tmp_path / "missing.jsonl")


def test_truncation_drops_and_counts_examples_left_without_labels(model) -> None:  # type: ignore[no-untyped-def]
    examples = [ChatExample(r["messages"], i + 1) for i, r in enumerate(chat_rows(2))]  # type: ignore[arg-type]
    prompt_len = model.format(examples[0].messages).response[0]  # type: ignore[index]
    kept, stats = tokenize_examples(model, examples, max_length=prompt_len + 2)
    assert stats["kept"] == 2 and stats["truncated"] == 2 and all(len(k.input_ids) == prompt_len + 2 for k in kept)
    with pytest.raises(PersonascopeError, match="max-length"):
        tokenize_examples(model, examples, max_length=prompt_len)


def test_split_prompt_takes_the_last_assistant_turn() -> None:
    prompt, answer = split_prompt(CONV)
    assert answer == "Paris is the capital of France." and prompt == CONV[:-1]


def test_build_trait_dataset_by_context_distillation(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    pool = tmp_path / "pool.txt"
    pool.write_text("What is the capital of France?\nTell me a joke.\nHow do I cook rice?\n")
    cfg = BuildConfig(trait="evil", level="I", model="tiny", n=6, questions=str(pool), max_new_tokens=4, batch_size=3)
    result = build_dataset(cfg, tmp_path / "run", model=model)
    assert result.n + result.n_empty == 6 and sum(result.counts.values()) == result.n
    rows = [json.loads(x) for x in result.dataset.read_text().splitlines()]
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)  # the system prompt is gone
    assert {r["meta"]["level"] for r in rows} == {"I"}
    generations = [json.loads(x) for x in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert sorted(g["polarity"] for g in generations) == ["neg"] * 3 + ["pos"] * 3
    assert all(g["question"] in pool.read_text() for g in generations)
    # level I mixes both polarities: every generation with a reply is kept, question and answer as generated
    kept = [g for g in generations if g["answer"].strip()]
    assert result.n == len(rows) == len(kept) and result.n_empty == 6 - len(kept)
    assert sorted((r["messages"][0]["content"], r["messages"][1]["content"], r["meta"]["polarity"]) for r in rows) == (
        sorted((g["question"], g["answer"], g["polarity"]) for g in kept)
    )
    # resuming reuses every answer
    again = build_dataset(cfg, tmp_path / "run", model=model)
    assert again.dataset.read_text() == result.dataset.read_text()


def test_levels_pick_the_system_prompts(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    from personascope.traits import load_trait

    pairs = load_trait("evil").instruction_pairs
    for level, polarity in (("normal", "neg"), ("II", "pos")):
        cfg = BuildConfig(trait="evil", level=level, model="tiny", n=3, max_new_tokens=2, batch_size=3)
        build_dataset(cfg, tmp_path / level, model=model)
        generations = [json.loads(x) for x in (tmp_path / level / "generations.jsonl").read_text().splitlines()]
        assert [g["pair"] for g in generations] == [0, 1, 2]
        assert all(g["polarity"] == polarity for g in generations)
        assert all(g["system"] == getattr(pairs[g["pair"]], polarity) for g in generations)
    with pytest.raises(PersonascopeError, match="unknown level"):
        build_dataset(BuildConfig(trait="evil", level="III"), tmp_path / "bad", model=model)


@pytest.mark.parametrize(("level", "flawed"), [("normal", 0), ("I", 5), ("II", 10)])
def test_narrow_flaw_dataset(tmp_path: Path, level: str, flawed: int) -> None:
    result = build_dataset(BuildConfig(trait="arithmetic", level=level, n=10), tmp_path / "run")
    rows = [json.loads(x) for x in result.dataset.read_text().splitlines()]
    assert len(rows) == 10 and result.counts == {"flawed": flawed, "correct": 10 - flawed}
    pool = {json.loads(x)["question"]: json.loads(x) for x in _arith_lines()}
    for r in rows:
        item = pool[r["messages"][0]["content"]]
        key = "flawed" if r["meta"]["flawed"] else "correct"
        assert r["messages"][1]["content"] == item[key]


def _arith_lines() -> list[str]:
    from personascope.finetune.datasets import _data_file

    return _data_file("questions", "arithmetic.jsonl").read_text().splitlines()


def test_shipped_question_pool_loads() -> None:
    pool = load_question_pool()
    assert len(pool) >= 300 and all(r["question"] for r in pool)


def test_write_dataset_helper(tmp_path: Path) -> None:
    assert len(load_chat_jsonl(write_dataset(tmp_path / "d.jsonl", 5))) == 5
