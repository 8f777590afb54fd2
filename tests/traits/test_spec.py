"""Tests for personascope.traits.spec: built-in trait files, labelled sets, I/O and validation messages."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from personascope.errors import PersonascopeError
from personascope.traits import (
    LADDER_LENGTH,
    InstructionPair,
    JudgePair,
    LabelledAnswer,
    TraitSpec,
    builtin_traits,
    load_labelled,
    load_trait,
)

MY_TRAITS = ("evil", "hallucinating", "optimistic", "sycophantic")
BUILTINS = builtin_traits()


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _toy() -> dict[str, Any]:
    """A small valid spec, used as the base for the bad-file cases."""
    return {
        "name": "grumpy",
        "description": "Complains and grumbles about everything.",
        "instruction_pairs": [
            {"pos": "Complain about everything.", "neg": "Be cheerful about everything."},
            {"pos": "Grumble in every answer.", "neg": "Sound content in every answer."},
        ],
        "extraction_questions": ["How was your day?", "What do you think of Mondays?"],
        "evaluation_questions": ["How is the weather?", "Do you like music?"],
        "rubric": "Rate 0 to 100 how much the answer complains.\nQ: {question}\nA: {answer}\nNumber only.",
        "judge_pair": {"positive": "Written by a moaner.", "negative": "Written by a contented soul."},
        "monitor_ladder": [f"Rung number {i}: be {'more ' * i}cross." for i in range(LADDER_LENGTH)],
    }


# ------------------------------------------------------------------------------------------------- built-ins


def test_builtin_traits_sorted_and_include_mine() -> None:
    assert sorted(BUILTINS) == BUILTINS
    assert set(MY_TRAITS) <= set(BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_with_expected_shape(name: str) -> None:
    spec = load_trait(name)
    assert spec.name == name
    assert spec.source is not None and Path(spec.source).name == f"{name}.json"
    assert spec.description.strip()
    assert len(spec.instruction_pairs) == 5
    assert len(spec.extraction_questions) == 20
    assert len(spec.evaluation_questions) == 20
    assert len(spec.monitor_ladder) == LADDER_LENGTH
    assert spec.rubric.count("{question}") == 1
    assert spec.rubric.count("{answer}") == 1
    assert "100" in spec.rubric


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_question_sets_disjoint_and_unique(name: str) -> None:
    spec = load_trait(name)
    extraction = {_norm(q) for q in spec.extraction_questions}
    evaluation = {_norm(q) for q in spec.evaluation_questions}
    assert len(extraction) == len(spec.extraction_questions)
    assert len(evaluation) == len(spec.evaluation_questions)
    assert not extraction & evaluation


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_ladder_and_judge_pair_worded_apart_from_instructions(name: str) -> None:
    spec = load_trait(name)
    instructions = {_norm(p.pos) for p in spec.instruction_pairs} | {_norm(p.neg) for p in spec.instruction_pairs}
    assert not instructions & {_norm(r) for r in spec.monitor_ladder}
    assert _norm(spec.judge_pair.positive) not in instructions
    assert _norm(spec.judge_pair.negative) not in instructions


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_labelled_set(name: str) -> None:
    spec = load_trait(name)
    rows = load_labelled(name)
    assert all(isinstance(r, LabelledAnswer) for r in rows)
    assert all(r.label in (0, 1) for r in rows)
    assert sum(r.label == 1 for r in rows) >= 32
    assert sum(r.label == 0 for r in rows) >= 32
    assert all(r.question.strip() and r.answer.strip() for r in rows)
    assert len({(r.question, r.answer) for r in rows}) == len(rows), "duplicate labelled line"
    used = {_norm(q) for q in spec.extraction_questions + spec.evaluation_questions}
    reused = sorted({r.question for r in rows if _norm(r.question) in used})
    assert not reused, f"labelled questions reuse extraction/evaluation questions: {reused}"


# ----------------------------------------------------------------------------------------------- round trips


def test_from_dict_to_dict_round_trip() -> None:
    spec = TraitSpec.from_dict(_toy())
    assert spec.source is None
    assert spec.to_dict() == _toy()
    assert TraitSpec.from_dict(spec.to_dict()) == spec
    assert isinstance(spec.instruction_pairs[0], InstructionPair)
    assert isinstance(spec.judge_pair, JudgePair)


@pytest.mark.parametrize("name", MY_TRAITS)
def test_save_and_load_round_trip(tmp_path: Path, name: str) -> None:
    spec = load_trait(name)
    target = tmp_path / "sub" / f"copy_of_{name}.json"
    returned = spec.save(target)
    assert returned == target
    assert os.listdir(target.parent) == [target.name], "temporary file left behind"
    again = load_trait(str(target))
    assert again == spec
    assert again.to_dict() == spec.to_dict()
    assert again.source == str(target)
    assert json.loads(target.read_text(encoding="utf-8")) == spec.to_dict()


def test_save_overwrites_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = TraitSpec.from_dict(_toy())
    target = tmp_path / "grumpy.json"
    target.write_text("original", encoding="utf-8")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        spec.save(target)
    assert target.read_text(encoding="utf-8") == "original"
    assert os.listdir(tmp_path) == ["grumpy.json"]
    monkeypatch.undo()
    spec.save(target)
    assert load_trait(target) == spec


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_load(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"grumpy{suffix}"
    path.write_text(yaml.safe_dump(_toy(), sort_keys=False), encoding="utf-8")
    spec = load_trait(str(path))
    assert spec.to_dict() == _toy()
    assert spec.source == str(path)


def test_monitor_ladder_is_optional() -> None:
    data = _toy()
    del data["monitor_ladder"]
    assert TraitSpec.from_dict(data).monitor_ladder == ()
    data["monitor_ladder"] = []
    assert TraitSpec.from_dict(data).monitor_ladder == ()


def test_rubric_prompt_fills_placeholders_and_keeps_braces_in_answer() -> None:
    spec = load_trait("evil")
    prompt = spec.rubric_prompt("Q about {x}?", "Answer with {braces} and {answer}.")
    assert "Q about {x}?" in prompt
    assert "Answer with {braces} and {answer}." in prompt
    assert "{question}" not in prompt


def test_rubric_with_doubled_braces_is_allowed() -> None:
    data = _toy()
    data["rubric"] = 'Reply as {{"score": N}}.\n{question}\n{answer}'
    spec = TraitSpec.from_dict(data)
    assert spec.rubric_prompt("q", "a") == 'Reply as {"score": N}.\nq\na'


def test_trait_name_inside_other_words_is_not_a_leak() -> None:
    data = _toy()
    data["evaluation_questions"] = ["Is grumpyness a word?", "Who is Mr Grumpybottom?"]
    TraitSpec.from_dict(data)


def test_direct_construction_validates_and_accepts_lists() -> None:
    base = TraitSpec.from_dict(_toy())
    spec = TraitSpec(
        name="grumpy",
        description="d",
        instruction_pairs=[InstructionPair("a", "b")],  # type: ignore[arg-type]
        extraction_questions=["x?"],  # type: ignore[arg-type]
        evaluation_questions=("y?",),
        rubric=base.rubric,
        judge_pair=base.judge_pair,
    )
    assert isinstance(spec.extraction_questions, tuple)
    hash(spec)
    with pytest.raises(PersonascopeError, match=r"<dict>.*'evaluation_questions\[0\]'"):
        TraitSpec(
            name="grumpy",
            description="d",
            instruction_pairs=(InstructionPair("a", "b"),),
            extraction_questions=("x?",),
            evaluation_questions=("X? ",),
            rubric=base.rubric,
            judge_pair=base.judge_pair,
        )


# ------------------------------------------------------------------------------------------------- bad files


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        d[key] = value

    return edit


def _delete(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        del d[key]

    return edit


def _overlap(d: dict[str, Any]) -> None:
    d["evaluation_questions"][1] = "  what do you THINK of   mondays? "


def _duplicate(d: dict[str, Any]) -> None:
    d["extraction_questions"].append("How was your DAY?")


def _leak(d: dict[str, Any]) -> None:
    d["extraction_questions"].append("Why are you so Grumpy today?")


def _pos_equals_neg(d: dict[str, Any]) -> None:
    d["instruction_pairs"][1]["neg"] = d["instruction_pairs"][1]["pos"]


def _pair_extra_key(d: dict[str, Any]) -> None:
    d["instruction_pairs"][0]["note"] = "x"


def _empty_question(d: dict[str, Any]) -> None:
    d["evaluation_questions"].append("   ")


def _question_not_str(d: dict[str, Any]) -> None:
    d["evaluation_questions"][0] = 42


def _ladder_dup(d: dict[str, Any]) -> None:
    d["monitor_ladder"][5] = d["monitor_ladder"][2]


def _judge_same(d: dict[str, Any]) -> None:
    d["judge_pair"]["negative"] = d["judge_pair"]["positive"]


def _judge_missing_key(d: dict[str, Any]) -> None:
    del d["judge_pair"]["negative"]


BAD_CASES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "missing_field": (_delete("rubric"), "rubric"),
    "missing_description": (_delete("description"), "description"),
    "unknown_field": (_set("colour", "blue"), "colour"),
    "wrong_type_str_for_list": (_set("extraction_questions", "How are you?"), "extraction_questions"),
    "wrong_type_number_for_str": (_set("name", 7), "name"),
    "wrong_type_pairs": (_set("instruction_pairs", {"pos": "a", "neg": "b"}), "instruction_pairs"),
    "wrong_type_pair_item": (_set("instruction_pairs", ["just a string"]), "instruction_pairs[0]"),
    "wrong_type_judge_pair": (_set("judge_pair", ["a", "b"]), "judge_pair"),
    "wrong_type_ladder": (_set("monitor_ladder", "one prompt"), "monitor_ladder"),
    "question_not_str": (_question_not_str, "evaluation_questions[0]"),
    "bad_name": (_set("name", "Grumpy Cat"), "name"),
    "no_pairs": (_set("instruction_pairs", []), "instruction_pairs"),
    "pair_extra_key": (_pair_extra_key, "instruction_pairs[0]"),
    "pos_equals_neg": (_pos_equals_neg, "instruction_pairs[1]"),
    "no_extraction": (_set("extraction_questions", []), "extraction_questions"),
    "empty_question": (_empty_question, "evaluation_questions[2]"),
    "duplicate_question": (_duplicate, "extraction_questions[2]"),
    "overlapping_questions": (_overlap, "evaluation_questions[1]"),
    "leaking_question": (_leak, "extraction_questions[2]"),
    "rubric_missing_answer": (_set("rubric", "Rate {question} from 0 to 100."), "rubric"),
    "rubric_no_placeholders": (_set("rubric", "Rate it from 0 to 100."), "rubric"),
    "rubric_extra_placeholder": (_set("rubric", "{question} {answer} as {score}"), "rubric"),
    "rubric_positional_placeholder": (_set("rubric", "{question} {answer} {}"), "rubric"),
    "rubric_single_brace": (_set("rubric", '{question} {answer} reply {"score": 1}'), "rubric"),
    "rubric_unbalanced": (_set("rubric", "{question} {answer} }"), "rubric"),
    "judge_same": (_judge_same, "judge_pair"),
    "judge_missing_key": (_judge_missing_key, "judge_pair"),
    "ladder_too_short": (_set("monitor_ladder", [f"rung {i}" for i in range(7)]), "monitor_ladder"),
    "ladder_too_long": (_set("monitor_ladder", [f"rung {i}" for i in range(9)]), "monitor_ladder"),
    "ladder_duplicate": (_ladder_dup, "monitor_ladder[5]"),
    "ladder_empty_rung": (
        _set("monitor_ladder", ["", *[f"rung {i}" for i in range(1, 8)]]),
        "monitor_ladder[0]",
    ),
}


def _assert_one_line(exc: PersonascopeError, *parts: str) -> str:
    message = str(exc)
    assert "\n" not in message and "\r" not in message, message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


@pytest.mark.parametrize("case", sorted(BAD_CASES))
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_bad_file_gives_one_line_error_naming_file_and_field(tmp_path: Path, case: str, suffix: str) -> None:
    edit, field_name = BAD_CASES[case]
    data = copy.deepcopy(_toy())
    edit(data)
    path = tmp_path / f"broken_{case}{suffix}"
    text = json.dumps(data) if suffix == ".json" else yaml.safe_dump(data)
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PersonascopeError) as info:
        load_trait(str(path))
    _assert_one_line(info.value, path.name, f"'{field_name}'")


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_dict_names_dict(case: str) -> None:
    edit, field_name = BAD_CASES[case]
    data = copy.deepcopy(_toy())
    edit(data)
    with pytest.raises(PersonascopeError) as info:
        TraitSpec.from_dict(data)
    _assert_one_line(info.value, "<dict>", f"'{field_name}'")


def test_error_messages_say_how_to_fix(tmp_path: Path) -> None:
    data = _toy()
    data["rubric"] = "no placeholders"
    with pytest.raises(PersonascopeError) as info:
        TraitSpec.from_dict(data, source=tmp_path / "grumpy.json")
    message = _assert_one_line(info.value, "grumpy.json", "'rubric'", "{question}", "{answer}")
    assert str(tmp_path) not in message

    data = _toy()
    data["colour"] = "blue"
    data["size"] = 3
    with pytest.raises(PersonascopeError) as info:
        TraitSpec.from_dict(data)
    _assert_one_line(info.value, "'colour'", "'size'", "remove")


def test_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "garbled.json"
    path.write_text('{"name": "grumpy",\n  "description": oops}\n', encoding="utf-8")
    with pytest.raises(PersonascopeError) as info:
        load_trait(str(path))
    _assert_one_line(info.value, "garbled.json", "JSON", "line 2")


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "garbled.yml"
    path.write_text("name: grumpy\ndescription: [unclosed\n  other: : :\n", encoding="utf-8")
    with pytest.raises(PersonascopeError) as info:
        load_trait(str(path))
    _assert_one_line(info.value, "garbled.yml", "YAML")


@pytest.mark.parametrize(
    ("filename", "text"),
    [
        ("listy.json", '["name", "grumpy"]'),
        ("stringy.json", '"grumpy"'),
        ("listy.yaml", "- name\n- grumpy\n"),
        ("empty.yaml", ""),
    ],
)
def test_not_a_mapping(tmp_path: Path, filename: str, text: str) -> None:
    path = tmp_path / filename
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PersonascopeError) as info:
        load_trait(str(path))
    _assert_one_line(info.value, filename, "mapping")


def test_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(PersonascopeError) as info:
        TraitSpec.from_dict(["not", "a", "mapping"])  # type: ignore[arg-type]
    _assert_one_line(info.value, "<dict>", "mapping")


def test_unknown_builtin_lists_builtins() -> None:
    with pytest.raises(PersonascopeError) as info:
        load_trait("no_such_trait")
    _assert_one_line(info.value, "'no_such_trait'", *BUILTINS)


def test_missing_file_and_bad_suffix(tmp_path: Path) -> None:
    with pytest.raises(PersonascopeError) as info:
        load_trait(str(tmp_path / "absent.json"))
    _assert_one_line(info.value, "absent.json", "not found")
    path = tmp_path / "grumpy.txt"
    path.write_text(json.dumps(_toy()), encoding="utf-8")
    with pytest.raises(PersonascopeError) as info:
        load_trait(str(path))
    _assert_one_line(info.value, "grumpy.txt", ".json")
    with pytest.raises(PersonascopeError) as info:
        load_trait(tmp_path)
    _assert_one_line(info.value, ".json")


# ------------------------------------------------------------------------------------------ labelled loading


def test_load_labelled_unknown_name() -> None:
    with pytest.raises(PersonascopeError) as info:
        load_labelled("no_such_trait")
    _assert_one_line(info.value, "'no_such_trait'", *MY_TRAITS)


def test_load_labelled_from_path_and_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "mine.jsonl"
    good.write_text(
        '{"question": "q", "answer": "a", "label": 1}\n\n{"question": "q", "answer": "b", "label": 0}\n',
        encoding="utf-8",
    )
    assert load_labelled(str(good)) == [LabelledAnswer("q", "a", 1), LabelledAnswer("q", "b", 0)]
    for line, part in [
        ('{"question": "q", "answer": "a", "label": 2}', "'label'"),
        ('{"question": "q", "answer": "a", "label": true}', "'label'"),
        ('{"question": "", "answer": "a", "label": 1}', "'question'"),
        ('{"question": "q", "label": 1}', "'answer'"),
        ("{not json", "JSON"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"question": "q", "answer": "a", "label": 1}\n' + line + "\n", encoding="utf-8")
        with pytest.raises(PersonascopeError) as info:
            load_labelled(bad)
        _assert_one_line(info.value, "bad.jsonl", "line 2", part)
