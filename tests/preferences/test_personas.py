from __future__ import annotations

import json
from pathlib import Path

import pytest

from personascope.errors import PersonascopeError
from personascope.preferences.personas import Persona, get_persona, load_personas


def test_shipped_personas() -> None:
    personas = load_personas()
    names = [p.name for p in personas]
    assert len(personas) >= 6
    assert {"assistant", "evil"} <= set(names)
    assert len(set(names)) == len(names)
    for p in personas:
        assert isinstance(p, Persona)
        assert len(p.system_prompt) > 40
        assert p.description and "\n" not in p.description
    assert len({p.system_prompt for p in personas}) == len(personas)
    assert get_persona("evil").name == "evil"


def write(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "personas.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def test_user_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            {"name": "pirate", "description": "Talks like a pirate.", "system_prompt": "You are a pirate."},
            {"name": "quiet", "system_prompt": "You speak as little as possible."},
        ],
    )
    personas = load_personas(path)
    assert [p.name for p in personas] == ["pirate", "quiet"]
    assert personas[1].description == ""
    assert get_persona("quiet", path).system_prompt == "You speak as little as possible."


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ([{"name": "pirate"}], r'persona "pirate" has a missing or empty "system_prompt"'),
        ([{"name": "pirate", "system_prompt": "   "}], r'persona "pirate" has a missing or empty "system_prompt"'),
        (
            [{"name": "a", "system_prompt": "You are A."}, {"name": "a", "system_prompt": "You are also A."}],
            r'persona name "a" appears twice',
        ),
        ([{"system_prompt": "Nameless."}], r'entry 0 has no valid "name"'),
        ([{"name": "a", "system_prompt": "x", "description": 3}], r"non-string"),
        ([], r"non-empty JSON list"),
        ({"name": "a", "system_prompt": "x"}, r"non-empty JSON list"),
        (["just a string"], r"entry 0 is str"),
        ('[{"name": ', r"not valid JSON"),
    ],
    ids=[
        "no_prompt",
        "blank_prompt",
        "duplicate",
        "no_name",
        "bad_description",
        "empty",
        "not_list",
        "not_obj",
        "json",
    ],
)
def test_bad_files_raise_one_line(tmp_path: Path, content: object, expected: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(PersonascopeError, match=expected) as err:
        load_personas(path)
    assert "\n" not in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(PersonascopeError, match="does not exist"):
        load_personas(tmp_path / "nope.json")
    with pytest.raises(PersonascopeError, match="known personas: assistant"):
        get_persona("pirate")
