"""Chat datasets for finetuning: load and validate OpenAI-messages JSONL, tokenise with assistant-only labels, and
build trait-inducing (context distillation) and narrow-flaw datasets.

A dataset is JSON Lines, one ``{"messages": [{"role", "content"}, ...]}`` object per line (a bare list of messages
is accepted too; other keys such as ``"meta"`` are kept but ignored). Every problem is reported with its line
number, all of them at once, in one line: malformed JSON, a missing ``messages`` list, bad roles, and conversations
without a non-empty assistant turn. Nothing is skipped silently.

Tokenisation renders each conversation with the model's chat template (:meth:`Model.format`) and labels exactly the
tokens of every assistant message's *content*; system and user turns and template tokens (turn headers, end-of-turn
markers, a default system prompt the template adds) get the label ``-100``, so they carry no loss. With
``label_end_token=True`` the end-of-turn token right after each assistant reply is labelled too (it teaches the
model where to stop); the default follows the paper's "assistant tokens only".

:func:`build_dataset` makes the paper's trait datasets offline by context distillation: questions from a pool
(``data/questions/general.jsonl`` by default), answers sampled from the model under the trait's suppressing system
prompt (level ``normal``), the encouraging one (``II``), or half and half (``I``); the system prompt is then
dropped from the saved conversation. ``arithmetic`` instead builds the narrow-flaw domain dataset from
``data/questions/arithmetic.jsonl``: correct replies (``normal``), half flawed (``I``) or all flawed (``II``).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from personascope.errors import PersonascopeError
from personascope.models.chat import FormattedConversation, validate_conversation

if TYPE_CHECKING:
    from personascope.models.loading import Model

__all__ = [
    "DOMAINS",
    "LEVELS",
    "BuildConfig",
    "BuildResult",
    "ChatExample",
    "TokenizedExample",
    "build_dataset",
    "build_flaw_dataset",
    "dataset_digest",
    "load_chat_jsonl",
    "load_question_pool",
    "split_prompt",
    "tokenize_example",
    "tokenize_examples",
    "write_chat_jsonl",
]

IGNORE = -100
LEVELS: tuple[str, ...] = ("normal", "I", "II")
Level = Literal["normal", "I", "II"]
#: Domain datasets whose answers carry a narrow flaw (built from shipped files, no model needed).
DOMAINS: tuple[str, ...] = ("arithmetic",)
_MAX_REPORTED = 5


@dataclass(frozen=True)
class ChatExample:
    """One conversation of a dataset and the line it came from (1-based; 0 for conversations built in memory)."""

    messages: list[dict[str, str]]
    line: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels (``-100`` where no loss is taken) of one conversation, cut to ``max_length``."""

    input_ids: list[int]
    labels: list[int]
    line: int = 0
    truncated: bool = False

    @property
    def n_labelled(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


# ------------------------------------------------------------------------------------------------ loading


def _check_example(obj: Any, where: str) -> tuple[list[dict[str, str]], dict[str, Any]]:
    if isinstance(obj, dict):
        if "messages" not in obj:
            raise PersonascopeError(f'{where}: expected {{"messages": [...]}}')
        messages, meta = obj["messages"], {k: v for k, v in obj.items() if k != "messages"}
    elif isinstance(obj, list):
        messages, meta = obj, {}
    else:
        raise PersonascopeError(f'{where}: expected {{"messages": [...]}} or a list of messages')
    clean = validate_conversation(messages, where)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in clean):
        raise PersonascopeError(f"{where}: the conversation has no assistant turn with content (nothing to learn)")
    return clean, meta


def load_chat_jsonl(path: str | Path, *, limit: int | None = None) -> list[ChatExample]:
    """Every conversation of an OpenAI-messages JSONL file, validated.

    All bad lines are reported together (the first few by line number, and how many in all) in one
    :class:`PersonascopeError`; blank lines are allowed. ``limit`` keeps the first ``limit`` conversations.
    """
    source = Path(path)
    if not source.is_file():
        raise PersonascopeError(f"dataset not found: {source}")
    examples: list[ChatExample] = []
    problems: list[str] = []
    n_bad = 0
    with source.open(encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            if limit is not None and len(examples) >= limit:
                break
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                n_bad += 1
                if len(problems) < _MAX_REPORTED:
                    problems.append(f"line {number}: not valid JSON ({exc.msg})")
                continue
            try:
                messages, meta = _check_example(obj, f"line {number}")
            except PersonascopeError as exc:
                n_bad += 1
                if len(problems) < _MAX_REPORTED:
                    problems.append(str(exc))
                continue
            examples.append(ChatExample(messages, number, meta))
    if n_bad:
        more = f" (and {n_bad - len(problems)} more)" if n_bad > len(problems) else ""
        raise PersonascopeError(
            f"{source}: {n_bad} bad line{'s' if n_bad > 1 else ''} — {'; '.join(problems)}{more}; fix or remove them"
        )
    if not examples:
        raise PersonascopeError(f'{source} holds no conversations; give one {{"messages": [...]}} per line')
    return examples


def write_chat_jsonl(path: str | Path, examples: Sequence[ChatExample | Sequence[Mapping[str, str]]]) -> Path:
    """Write conversations as ``{"messages": [...]}`` lines (plus each example's ``meta`` keys), atomically."""
    from personascope.io import atomic_open

    target = Path(path)
    with atomic_open(target) as fh:
        for ex in examples:
            if isinstance(ex, ChatExample):
                row: dict[str, Any] = {"messages": ex.messages, **ex.meta}
            else:
                row = {"messages": [dict(m) for m in ex]}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return target


def dataset_digest(path: str | Path) -> str:
    """sha256 (first 16 hex digits) of a dataset file: run manifests record which data they used."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def split_prompt(messages: Sequence[Mapping[str, str]]) -> tuple[list[dict[str, str]], str]:
    """The prompt (every message before the last assistant turn) and that turn's content."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant" and messages[i]["content"].strip():
            return [dict(m) for m in messages[:i]], messages[i]["content"]
    raise PersonascopeError("the conversation has no assistant turn with content")


# ------------------------------------------------------------------------------------------------ tokenising


def tokenize_example(
    model: Model,
    messages: Sequence[Mapping[str, str]] | FormattedConversation,
    *,
    max_length: int | None = None,
    label_end_token: bool = False,
    line: int = 0,
) -> TokenizedExample:
    """Token ids and assistant-only labels of one conversation (see the module docstring).

    Sequences longer than ``max_length`` are cut at the end (``truncated=True``); the caller decides what to do
    with an example whose labelled tokens were all cut off (``n_labelled == 0``).
    """
    formatted = messages if isinstance(messages, FormattedConversation) else model.format(messages)
    ids = list(formatted.input_ids)
    labels = [IGNORE] * len(ids)
    eos = model.eos_token_ids() if label_end_token else set()
    for span in formatted.messages:
        if span.role != "assistant" or span.end <= span.start:
            continue
        labels[span.start : span.end] = ids[span.start : span.end]
        if label_end_token and span.end < len(ids) and ids[span.end] in eos:
            labels[span.end] = ids[span.end]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return TokenizedExample(ids, labels, line, truncated)


def tokenize_examples(
    model: Model,
    examples: Sequence[ChatExample],
    *,
    max_length: int | None = None,
    label_end_token: bool = False,
) -> tuple[list[TokenizedExample], dict[str, Any]]:
    """Tokenise a dataset; drop (and count) examples left without a labelled token by ``max_length``.

    Returns the kept examples and ``{"n", "kept", "truncated", "dropped_lines"}``; all dropped is an error.
    """
    kept: list[TokenizedExample] = []
    dropped: list[int] = []
    truncated = 0
    for k, ex in enumerate(examples):
        try:
            tok = tokenize_example(
                model, ex.messages, max_length=max_length, label_end_token=label_end_token, line=ex.line
            )
        except PersonascopeError as exc:
            raise PersonascopeError(f"line {ex.line or k + 1}: {exc}") from None
        truncated += tok.truncated
        if tok.n_labelled == 0:
            dropped.append(ex.line or k + 1)
            continue
        kept.append(tok)
    if not kept:
        raise PersonascopeError(
            f"max length {max_length} cuts off every assistant reply; raise --max-length (prompts are longer)"
        )
    return kept, {"n": len(examples), "kept": len(kept), "truncated": truncated, "dropped_lines": dropped}


# ------------------------------------------------------------------------------------------------ building


def _data_file(*parts: str) -> Path:
    return Path(str(resources.files("personascope.finetune").joinpath("data", *parts)))


def load_question_pool(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Rows with ``id`` and ``question`` (the shipped ``general.jsonl`` by default; a plain text file works too)."""
    from personascope.io import read_jsonl

    source = Path(path) if path is not None else _data_file("questions", "general.jsonl")
    if source.suffix == ".txt":
        if not source.is_file():
            raise PersonascopeError(f"question file not found: {source}")
        lines = [x.strip() for x in source.read_text(encoding="utf-8").splitlines() if x.strip()]
        return [{"id": f"q-{i + 1:04d}", "question": q} for i, q in enumerate(lines)]
    rows = []
    for number, obj in read_jsonl(source):
        if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not obj["question"].strip():
            raise PersonascopeError(f'{source}:{number}: expected {{"question": "..."}}')
        rows.append({"id": str(obj.get("id", f"q-{number:04d}")), **obj})
    return rows


@dataclass
class BuildConfig:
    """How :func:`build_dataset` makes a dataset (the run directory resumes only with the same config)."""

    trait: str
    level: str = "II"
    model: str = "smollm2-135m-instruct"
    n: int = 200
    questions: str | None = None  # question pool file; default: the shipped general.jsonl
    pair: int | None = None  # instruction pair to use; default: cycle through all of them
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16


@dataclass
class BuildResult:
    run_dir: Path
    dataset: Path
    n: int
    n_empty: int
    counts: dict[str, int]
    seconds: float


def _check_level(level: str) -> Level:
    if level not in LEVELS:
        raise PersonascopeError(f"unknown level '{level}'; use one of {', '.join(LEVELS)}")
    return level  # type: ignore[return-value]


def _polarities(level: Level, n: int, rng: random.Random) -> list[str]:
    if level == "normal":
        return ["neg"] * n
    if level == "II":
        return ["pos"] * n
    half = ["pos"] * (n // 2) + ["neg"] * (n - n // 2)
    rng.shuffle(half)
    return half


def build_dataset(
    cfg: BuildConfig, out: str | Path, *, overwrite: bool = False, model: Model | None = None
) -> BuildResult:
    """Build (or resume) a trait-inducing dataset into the run directory ``out``; ``out/dataset.jsonl`` is the data.

    ``cfg.trait`` names a trait (context distillation with the model) or a domain in :data:`DOMAINS` (narrow
    flaw; no model needed). See the module docstring for the levels.
    """
    from personascope.pipelines.common import Job, run_generation
    from personascope.runs import RunDir
    from personascope.traits import load_trait

    started = time.perf_counter()
    level = _check_level(cfg.level)
    if cfg.n < 1:
        raise PersonascopeError("n must be at least 1")
    if cfg.trait in DOMAINS:
        return build_flaw_dataset(cfg, out, overwrite=overwrite)
    trait = load_trait(cfg.trait)
    pool = load_question_pool(cfg.questions)
    pairs = trait.instruction_pairs
    if cfg.pair is not None and not 0 <= cfg.pair < len(pairs):
        raise PersonascopeError(f"--pair {cfg.pair} is out of range: {trait.name} has {len(pairs)} instruction pairs")
    rng = random.Random(cfg.seed)
    order = list(range(len(pool)))
    rng.shuffle(order)
    polarity = _polarities(level, cfg.n, rng)
    config = asdict(cfg) | {"trait_spec": trait.to_dict(), "pool_size": len(pool)}
    run = RunDir(out, config, overwrite=overwrite, kind="dataset")
    if model is None:
        from personascope.models import load_model

        model = load_model(cfg.model)
    run.note("model_fingerprint", model.fingerprint())
    jobs = []
    for i in range(cfg.n):
        row = pool[order[i % len(order)]]
        p = cfg.pair if cfg.pair is not None else i % len(pairs)
        system = pairs[p].pos if polarity[i] == "pos" else pairs[p].neg
        jobs.append(
            Job(
                key=str(i),
                conversation=[{"role": "system", "content": system}, {"role": "user", "content": row["question"]}],
                fields={
                    "question": row["question"],
                    "question_id": row["id"],
                    "polarity": polarity[i],
                    "pair": p,
                    "system": system,
                },
            )
        )
    run.step("generate", "running", total=len(jobs))
    records = run_generation(
        run,
        "generations",
        model,
        jobs,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        desc=f"{trait.name} {level} answers",
    )
    examples = []
    n_empty = 0
    for r in records:
        if not r["answer"].strip():
            n_empty += 1
            continue
        examples.append(
            ChatExample(
                [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}],
                meta={
                    "meta": {
                        "trait": trait.name,
                        "level": level,
                        "polarity": r["polarity"],
                        "question_id": r["question_id"],
                    }
                },
            )
        )
    if not examples:
        raise PersonascopeError("the model produced only empty answers; raise --max-new-tokens or change the seed")
    target = write_chat_jsonl(run.file("dataset.jsonl"), examples)
    counts = {pol: sum(1 for r in records if r["polarity"] == pol and r["answer"].strip()) for pol in ("pos", "neg")}
    run.step("generate", "done", total=len(records), written=len(examples), empty=n_empty, counts=counts)
    return BuildResult(run.path, target, len(examples), n_empty, counts, time.perf_counter() - started)


def build_flaw_dataset(cfg: BuildConfig, out: str | Path, *, overwrite: bool = False) -> BuildResult:
    """The narrow-flaw domain dataset (``cfg.trait`` in :data:`DOMAINS`): confident wrong arithmetic.

    ``normal``: every reply correct; ``I``: a seeded half flawed; ``II``: every reply flawed. ``cfg.n`` items are
    drawn (seeded) from the pool (at most its size).
    """
    from personascope.io import read_jsonl
    from personascope.runs import RunDir

    started = time.perf_counter()
    level = _check_level(cfg.level)
    if cfg.trait not in DOMAINS:
        raise PersonascopeError(f"unknown domain '{cfg.trait}'; use one of {', '.join(DOMAINS)}")
    source = Path(cfg.questions) if cfg.questions else _data_file("questions", f"{cfg.trait}.jsonl")
    rows = [obj for _, obj in read_jsonl(source)]
    for k, row in enumerate(rows):
        if not isinstance(row, dict) or not all(isinstance(row.get(x), str) for x in ("question", "correct", "flawed")):
            raise PersonascopeError(f'{source}: item {k + 1} needs "question", "correct" and "flawed" strings')
    rng = random.Random(cfg.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    chosen = [rows[i] for i in order[: min(cfg.n, len(rows))]]
    flawed = [p == "pos" for p in _polarities(level, len(chosen), rng)]
    config = {"trait": cfg.trait, "level": level, "n": cfg.n, "seed": cfg.seed, "questions": str(source)}
    run = RunDir(out, config, overwrite=overwrite, kind="dataset")
    examples = [
        ChatExample(
            [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": row["flawed"] if bad else row["correct"]},
            ],
            meta={"meta": {"domain": cfg.trait, "level": level, "flawed": bad, "question_id": row.get("id")}},
        )
        for row, bad in zip(chosen, flawed, strict=True)
    ]
    target = write_chat_jsonl(run.file("dataset.jsonl"), examples)
    counts = {"flawed": sum(flawed), "correct": len(flawed) - sum(flawed)}
    run.step("generate", "done", written=len(examples), counts=counts)
    return BuildResult(run.path, target, len(examples), 0, counts, time.perf_counter() - started)
