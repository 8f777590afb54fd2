"""Trait specifications: what a trait is, how to elicit it, and how to judge it.

A :class:`TraitSpec` holds everything the pipelines need to build and use a persona vector for one
character trait: contrastive system prompts (:class:`InstructionPair`), two disjoint question sets
(extraction and evaluation), a judge rubric, a contrastive persona pair for likelihood judges
(:class:`JudgePair`) and an optional ladder of eight system prompts graded from suppressing to encouraging
the trait (for monitoring).

Specs are stored as JSON (or YAML) files. :func:`load_trait` accepts a built-in name (see
:func:`builtin_traits`) or a path. :meth:`TraitSpec.from_dict` validates the content and raises
:class:`~personascope.errors.PersonascopeError` with one line naming the file, the field and the fix.

Built-in traits also ship a labelled set of answers (:func:`load_labelled`) used to measure judge quality
and as in-context examples.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from personascope.errors import PersonascopeError
from personascope.io import atomic_open

__all__ = [
    "LADDER_LENGTH",
    "InstructionPair",
    "JudgePair",
    "LabelledAnswer",
    "TraitSpec",
    "builtin_traits",
    "load_labelled",
    "load_trait",
]

#: Rungs in a non-empty monitor ladder (index 0 suppresses the trait most, the last encourages it most).
LADDER_LENGTH = 8

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_REQUIRED_FIELDS = (
    "name",
    "description",
    "instruction_pairs",
    "extraction_questions",
    "evaluation_questions",
    "rubric",
    "judge_pair",
)
_OPTIONAL_FIELDS = ("monitor_ladder",)
_ALL_FIELDS = _REQUIRED_FIELDS + _OPTIONAL_FIELDS
_RUBRIC_PLACEHOLDERS = frozenset({"question", "answer"})
_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass(frozen=True)
class InstructionPair:
    """Two system prompts: ``pos`` makes the assistant show the trait, ``neg`` makes it avoid it."""

    pos: str
    neg: str


@dataclass(frozen=True)
class JudgePair:
    """Two persona descriptions for contrast-likelihood judging: one embodies the trait, one its opposite."""

    positive: str
    negative: str


@dataclass(frozen=True)
class LabelledAnswer:
    """An answer labelled 1 when it clearly shows the trait and 0 when it clearly does not."""

    question: str
    answer: str
    label: int


@dataclass(frozen=True)
class TraitSpec:
    """Everything needed to extract, evaluate and monitor one character trait.

    Construct with :meth:`from_dict` or :func:`load_trait`; both validate. ``source`` is the file the spec was
    loaded from (``None`` for specs built in memory); it is not part of the file format and not compared.
    """

    name: str
    description: str
    instruction_pairs: tuple[InstructionPair, ...]
    extraction_questions: tuple[str, ...]
    evaluation_questions: tuple[str, ...]
    rubric: str
    judge_pair: JudgePair
    monitor_ladder: tuple[str, ...] = ()
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Accept lists from callers that build a spec directly; store tuples so the spec stays hashable.
        for name in ("instruction_pairs", "extraction_questions", "evaluation_questions", "monitor_ladder"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        _check_semantics(self, _label(self.source))

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-ready data (the file format; ``source`` is left out)."""
        return {
            "name": self.name,
            "description": self.description,
            "instruction_pairs": [{"pos": p.pos, "neg": p.neg} for p in self.instruction_pairs],
            "extraction_questions": list(self.extraction_questions),
            "evaluation_questions": list(self.evaluation_questions),
            "rubric": self.rubric,
            "judge_pair": {"positive": self.judge_pair.positive, "negative": self.judge_pair.negative},
            "monitor_ladder": list(self.monitor_ladder),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | os.PathLike[str] | None = None) -> TraitSpec:
        """Validate ``d`` and build a spec; ``source`` names the file in error messages.

        Raises :class:`PersonascopeError` (one line: file, field, fix) on any problem.
        """
        src = None if source is None else os.fspath(source)
        label = _label(src)
        if not isinstance(d, Mapping):
            raise _error(
                label,
                f"the top level must be a mapping of fields ({', '.join(_REQUIRED_FIELDS)}), not {_type_name(d)}",
            )
        unknown = [str(k) for k in d if k not in _ALL_FIELDS]
        if unknown:
            names = ", ".join(repr(k) for k in unknown)
            noun = "field" if len(unknown) == 1 else "fields"
            raise _error(
                label,
                f"unknown {noun} {names}; remove it (allowed fields: {', '.join(_ALL_FIELDS)})",
            )
        missing = [k for k in _REQUIRED_FIELDS if k not in d]
        if missing:
            listed = ", ".join(repr(k) for k in missing)
            what = f"field {listed} is" if len(missing) == 1 else f"fields {listed} are"
            raise _error(label, f"{what} missing; add it (required fields: {', '.join(_REQUIRED_FIELDS)})")
        name = _as_str(d["name"], "name", label)
        description = _as_str(d["description"], "description", label)
        rubric = _as_str(d["rubric"], "rubric", label)
        pairs = tuple(
            InstructionPair(**_as_str_mapping(item, f"instruction_pairs[{i}]", ("pos", "neg"), label))
            for i, item in enumerate(_as_list(d["instruction_pairs"], "instruction_pairs", label))
        )
        extraction = _as_str_tuple(d["extraction_questions"], "extraction_questions", label)
        evaluation = _as_str_tuple(d["evaluation_questions"], "evaluation_questions", label)
        judge_keys = ("positive", "negative")
        judge_pair = JudgePair(**_as_str_mapping(d["judge_pair"], "judge_pair", judge_keys, label))
        ladder_raw = d.get("monitor_ladder")
        ladder = () if ladder_raw is None else _as_str_tuple(ladder_raw, "monitor_ladder", label)
        return cls(
            name=name,
            description=description,
            instruction_pairs=pairs,
            extraction_questions=extraction,
            evaluation_questions=evaluation,
            rubric=rubric,
            judge_pair=judge_pair,
            monitor_ladder=ladder,
            source=src,
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the spec as JSON to ``path`` atomically (temp file in the same folder, then replace)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        with atomic_open(target) as fh:
            fh.write(text)
        return target

    # ------------------------------------------------------------------ use
    def rubric_prompt(self, question: str, answer: str) -> str:
        """The judge prompt for one question/answer pair (the rubric with both placeholders filled)."""
        return self.rubric.format(question=question, answer=answer)


# ---------------------------------------------------------------------- loading


def builtin_traits() -> list[str]:
    """Names of the built-in traits, sorted."""
    folder = _builtin_dir()
    if not folder.is_dir():
        return []
    return sorted(
        entry.name[: -len(".json")]
        for entry in folder.iterdir()
        if entry.is_file() and entry.name.endswith(".json") and not entry.name.startswith(".")
    )


def load_trait(name_or_path: str | os.PathLike[str]) -> TraitSpec:
    """Load a built-in trait by name, or a trait file (``.json``, ``.yaml``, ``.yml``) by path."""
    raw = os.fspath(name_or_path)
    looks_like_path = (
        isinstance(name_or_path, os.PathLike)
        or raw.lower().endswith(_SUFFIXES)
        or os.sep in raw
        or "/" in raw
        or (os.altsep is not None and os.altsep in raw)
    )
    if looks_like_path:
        return _load_file(Path(raw))
    names = builtin_traits()
    if raw not in names:
        known = ", ".join(names) if names else "none installed"
        raise PersonascopeError(
            f"unknown built-in trait {raw!r}; use one of: {known}, or give a path to a .json/.yaml trait file"
        )
    entry = _builtin_dir() / f"{raw}.json"
    return _parse(entry.read_text(encoding="utf-8"), f"{raw}.json", ".json", source=str(entry))


def load_labelled(name: str | os.PathLike[str]) -> list[LabelledAnswer]:
    """The labelled answers of a built-in trait (or of a ``.jsonl`` file given by path)."""
    raw = os.fspath(name)
    if isinstance(name, os.PathLike) or raw.lower().endswith(".jsonl"):
        path = Path(raw)
        label = path.name
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PersonascopeError(f"{raw}: file not found; check the path") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PersonascopeError(f"{raw}: cannot read the file ({_one_line(str(exc))})") from None
    else:
        folder = _builtin_dir() / "labelled"
        available = (
            sorted(e.name[: -len(".jsonl")] for e in folder.iterdir() if e.name.endswith(".jsonl"))
            if folder.is_dir()
            else []
        )
        if raw not in available:
            known = ", ".join(available) if available else "none installed"
            raise PersonascopeError(
                f"no labelled answers for trait {raw!r}; use one of: {known}, or give a path to a .jsonl file"
            )
        label = f"{raw}.jsonl"
        text = (folder / label).read_text(encoding="utf-8")
    return _parse_labelled(text, label)


# ---------------------------------------------------------------------- internals


def _builtin_dir() -> Traversable:
    return resources.files("personascope.traits").joinpath("builtin")


def _load_file(path: Path) -> TraitSpec:
    label = path.name
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise PersonascopeError(
            f"{label}: unsupported file type {path.suffix or '(none)'!r}; save the trait as .json, .yaml or .yml"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PersonascopeError(f"{path}: file not found; check the path or use a built-in trait name") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PersonascopeError(f"{path}: cannot read the file ({_one_line(str(exc))})") from None
    return _parse(text, label, suffix, source=str(path))


def _parse(text: str, label: str, suffix: str, source: str) -> TraitSpec:
    data: Any
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PersonascopeError(
                f"{label}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); fix the syntax"
            ) from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "syntax error"
            raise PersonascopeError(f"{label}: not valid YAML ({problem}{where}); fix the syntax") from None
    if not isinstance(data, Mapping):
        raise PersonascopeError(
            f"{label}: the top level must be a mapping of fields ({', '.join(_REQUIRED_FIELDS)}), "
            f"not {_type_name(data)}; wrap the content in {{...}}"
        )
    return TraitSpec.from_dict(data, source=source)


def _parse_labelled(text: str, label: str) -> list[LabelledAnswer]:
    out: list[LabelledAnswer] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{label}: line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PersonascopeError(f"{where} is not valid JSON ({exc.msg}); fix the syntax") from None
        if not isinstance(row, dict) or set(row) != {"question", "answer", "label"}:
            raise PersonascopeError(f"{where} must be an object with exactly the keys 'question', 'answer' and 'label'")
        question, answer, lab = row["question"], row["answer"], row["label"]
        if not isinstance(question, str) or not question.strip():
            raise PersonascopeError(f"{where}: field 'question' must be a non-empty string")
        if not isinstance(answer, str) or not answer.strip():
            raise PersonascopeError(f"{where}: field 'answer' must be a non-empty string")
        if isinstance(lab, bool) or lab not in (0, 1):
            raise PersonascopeError(f"{where}: field 'label' must be 0 or 1, not {lab!r}")
        out.append(LabelledAnswer(question=question, answer=answer, label=int(lab)))
    return out


def _label(source: str | None) -> str:
    return "<dict>" if source is None else (Path(source).name or source)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _error(label: str, message: str) -> PersonascopeError:
    return PersonascopeError(_one_line(f"{label}: {message}"))


def _short(text: str, limit: int = 60) -> str:
    text = _one_line(text)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _type_name(value: object) -> str:
    names = {dict: "a mapping", list: "a list", tuple: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "empty (null)"
    for typ, word in names.items():
        if isinstance(value, typ):
            return word
    if isinstance(value, int | float):
        return "a number"
    return f"a {type(value).__name__}"


def _as_str(value: object, name: str, label: str) -> str:
    if not isinstance(value, str):
        raise _error(label, f"field '{name}' must be a string, not {_type_name(value)}")
    return value


def _as_list(value: object, name: str, label: str) -> Sequence[object]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise _error(label, f"field '{name}' must be a list, not {_type_name(value)}")
    return value


def _as_str_tuple(value: object, name: str, label: str) -> tuple[str, ...]:
    items = _as_list(value, name, label)
    return tuple(_as_str(item, f"{name}[{i}]", label) for i, item in enumerate(items))


def _as_str_mapping(value: object, name: str, keys: tuple[str, ...], label: str) -> dict[str, str]:
    wanted = " and ".join(f"'{k}'" for k in keys)
    if not isinstance(value, Mapping):
        raise _error(label, f"field '{name}' must be a mapping with keys {wanted}, not {_type_name(value)}")
    extra = [str(k) for k in value if k not in keys]
    if extra:
        raise _error(
            label,
            f"field '{name}' has unknown key {', '.join(repr(k) for k in extra)}; only {wanted} are allowed",
        )
    missing = [k for k in keys if k not in value]
    if missing:
        raise _error(label, f"field '{name}' is missing key {', '.join(repr(k) for k in missing)}; add it")
    return {k: _as_str(value[k], f"{name}.{k}", label) for k in keys}


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _name_pattern(name: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in re.split(r"[_-]+", name) if p]
    return re.compile(r"(?<![a-z0-9])" + r"[\s_-]+".join(parts) + r"(?![a-z0-9])", re.IGNORECASE)


def _check_semantics(spec: TraitSpec, label: str) -> None:
    if not _NAME_RE.match(spec.name):
        raise _error(
            label,
            f"field 'name' is {_short(spec.name)}; use lowercase letters, digits, '_' or '-', "
            "starting with a letter (e.g. 'evil')",
        )
    if not spec.description.strip():
        raise _error(label, "field 'description' is empty; describe the trait in one sentence")

    if not spec.instruction_pairs:
        raise _error(label, 'field \'instruction_pairs\' is empty; add at least one {"pos": ..., "neg": ...}')
    for i, pair in enumerate(spec.instruction_pairs):
        for key in ("pos", "neg"):
            if not getattr(pair, key).strip():
                raise _error(label, f"field 'instruction_pairs[{i}].{key}' is empty; write a system prompt")
        if _norm(pair.pos) == _norm(pair.neg):
            raise _error(
                label,
                f"field 'instruction_pairs[{i}]' has the same text for 'pos' and 'neg'; "
                "'neg' must steer away from the trait",
            )

    leak = _name_pattern(spec.name)
    seen: dict[str, str] = {}
    for set_name in ("extraction_questions", "evaluation_questions"):
        questions: tuple[str, ...] = getattr(spec, set_name)
        if not questions:
            raise _error(label, f"field '{set_name}' is empty; add at least one question")
        for i, q in enumerate(questions):
            where = f"{set_name}[{i}]"
            if not q.strip():
                raise _error(label, f"field '{where}' is an empty question; write a question or remove it")
            key = _norm(q)
            if key in seen:
                other = seen[key]
                if other.split("[")[0] == set_name:
                    fix = "remove the duplicate"
                else:
                    fix = "extraction and evaluation questions must be disjoint; move or rephrase one of them"
                raise _error(label, f"field '{where}' {_short(q)} repeats '{other}'; {fix}")
            seen[key] = where
            if leak.search(q):
                raise _error(
                    label,
                    f"field '{where}' {_short(q)} names the trait {spec.name!r}; "
                    "rephrase it so the trait is not mentioned",
                )

    _check_rubric(spec.rubric, label)

    for key in ("positive", "negative"):
        if not getattr(spec.judge_pair, key).strip():
            raise _error(label, f"field 'judge_pair.{key}' is empty; write a one- or two-sentence persona")
    if _norm(spec.judge_pair.positive) == _norm(spec.judge_pair.negative):
        raise _error(
            label,
            "field 'judge_pair' has the same text for 'positive' and 'negative'; "
            "'negative' must describe the opposite persona",
        )

    ladder = spec.monitor_ladder
    if ladder:
        if len(ladder) != LADDER_LENGTH:
            raise _error(
                label,
                f"field 'monitor_ladder' has {len(ladder)} prompts; give exactly {LADDER_LENGTH} "
                "(most suppressing first, most encouraging last) or leave it empty",
            )
        rungs: dict[str, int] = {}
        for i, rung in enumerate(ladder):
            if not rung.strip():
                raise _error(label, f"field 'monitor_ladder[{i}]' is empty; write a system prompt")
            if _norm(rung) in rungs:
                raise _error(
                    label,
                    f"field 'monitor_ladder[{i}]' repeats 'monitor_ladder[{rungs[_norm(rung)]}]'; "
                    "every rung needs its own wording",
                )
            rungs[_norm(rung)] = i


def _check_rubric(rubric: str, label: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(rubric) if f is not None]
    except ValueError as exc:
        raise _error(
            label,
            f"field 'rubric' is not a valid template ({exc}); double any literal braces as {{{{ and }}}}",
        ) from None
    missing = sorted(_RUBRIC_PLACEHOLDERS - set(fields))
    if missing:
        raise _error(
            label,
            "field 'rubric' must contain the placeholders {question} and {answer} "
            f"(missing {', '.join('{' + m + '}' for m in missing)})",
        )
    extra = sorted({f for f in fields if f not in _RUBRIC_PLACEHOLDERS})
    if extra:
        shown = ", ".join("{" + f + "}" for f in extra)
        raise _error(
            label,
            f"field 'rubric' has the placeholder {shown}; only {{question}} and {{answer}} are allowed, "
            "double any other braces as {{ and }}",
        )
    try:
        rubric.format(question="", answer="")
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        raise _error(
            label,
            f"field 'rubric' cannot be formatted ({exc!r}); use plain {{question}} and {{answer}} "
            "and double any other braces",
        ) from None
