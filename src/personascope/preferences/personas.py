"""Personas: system prompts under which a model's task preferences are elicited and compared.

The shipped set (``preferences/data/personas.json``) has a default ``assistant``, a malicious ``evil`` persona and
several others of clearly different character. A user file is a JSON list of objects
``{"name": ..., "description": ..., "system_prompt": ...}``; ``description`` is optional.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from personascope.errors import PersonascopeError

__all__ = ["Persona", "get_persona", "load_personas"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Persona:
    """A named persona: a one-line ``description`` and the ``system_prompt`` that puts the model in character."""

    name: str
    description: str
    system_prompt: str


def _shipped() -> Traversable:
    return resources.files("personascope.preferences").joinpath("data", "personas.json")


def load_personas(path: str | Path | None = None) -> list[Persona]:
    """Load personas: the shipped set (``path=None``) or a JSON file holding a list of persona objects.

    Raises:
        PersonascopeError: one line naming the file (and the persona where there is one) for an unreadable file,
            invalid JSON, something other than a non-empty list of objects, a missing or malformed ``name``, a
            missing or empty ``system_prompt``, or two personas with the same name.
    """
    if path is None:
        source: Traversable | Path = _shipped()
        name = "the shipped personas"
    else:
        source = Path(path)
        name = str(path)
        if not source.is_file():
            raise PersonascopeError(f"persona file {name} does not exist; pass the path of a JSON persona file")
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PersonascopeError(f"cannot read persona file {name}: {exc}; check the path and that it is UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise PersonascopeError(f"{name} is not valid JSON ({exc.msg} at line {exc.lineno}); fix the syntax") from None
    if not isinstance(raw, list) or not raw:
        raise PersonascopeError(f'{name} must hold a non-empty JSON list of {{"name", "system_prompt"}} objects')
    personas: list[Persona] = []
    seen: set[str] = set()
    for k, obj in enumerate(raw):
        if not isinstance(obj, dict):
            raise PersonascopeError(f"{name}: entry {k} is {type(obj).__name__}, not an object; write one per persona")
        pname = obj.get("name")
        if not isinstance(pname, str) or not _NAME_RE.match(pname):
            raise PersonascopeError(
                f'{name}: entry {k} has no valid "name" (got {pname!r}); use letters, digits, "_", "-" or "."'
            )
        prompt = obj.get("system_prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PersonascopeError(
                f'{name}: persona "{pname}" has a missing or empty "system_prompt"; write the prompt that sets it up'
            )
        description = obj.get("description", "")
        if not isinstance(description, str):
            raise PersonascopeError(f'{name}: persona "{pname}" has a non-string "description"; make it one line')
        if pname in seen:
            raise PersonascopeError(f'{name}: persona name "{pname}" appears twice; give every persona a unique name')
        seen.add(pname)
        personas.append(Persona(name=pname, description=" ".join(description.split()), system_prompt=prompt.strip()))
    return personas


def get_persona(name: str, path: str | Path | None = None) -> Persona:
    """The persona called ``name`` from :func:`load_personas` (``path=None``: the shipped set)."""
    personas = load_personas(path)
    for persona in personas:
        if persona.name == name:
            return persona
    known = ", ".join(p.name for p in personas)
    raise PersonascopeError(f"unknown persona {name!r}; known personas: {known}")
