from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from personascope.errors import PersonascopeError
from personascope.preferences.tasks import SPLITS, Task, load_tasks, split_tasks, topics

REQUIRED_TOPICS = {
    "coding",
    "math",
    "creative_writing",
    "advice",
    "trivia",
    "tedious_chores",
    "harmful",
    "science",
    "history",
    "cooking",
    "philosophy",
    "games_puzzles",
    "emotional_support",
    "business",
}


def test_shipped_pool() -> None:
    tasks = load_tasks()
    assert len(tasks) >= 400
    ids = [t.id for t in tasks]
    assert len(set(ids)) == len(ids)
    assert len(topics(tasks)) >= 12
    assert set(topics(tasks)) >= REQUIRED_TOPICS
    per_topic = Counter(t.topic for t in tasks)
    assert max(per_topic.values()) <= 1.5 * min(per_topic.values())  # roughly balanced
    for topic in topics(tasks):
        splits = Counter(t.split for t in tasks if t.topic == topic)
        assert set(splits) == set(SPLITS), topic
        assert splits["train"] > splits["val"] and splits["train"] > splits["test"]
    share = Counter(t.split for t in tasks)
    assert 0.65 < share["train"] / len(tasks) < 0.75
    assert 0.12 < share["val"] / len(tasks) < 0.18 and 0.12 < share["test"] / len(tasks) < 0.18
    for t in tasks:
        assert t.text and "\n" not in t.text and t.text[0].isupper()
        assert t.id.startswith(t.topic + "-")
    assert len({t.text for t in tasks}) == len(tasks)


def test_split_tasks_and_topics() -> None:
    tasks = load_tasks()
    groups = split_tasks(tasks)
    assert list(groups) == list(SPLITS)
    assert sum(len(v) for v in groups.values()) == len(tasks)
    assert all(t.split == name for name, group in groups.items() for t in group)
    assert topics(tasks) == sorted(topics(tasks))
    assert split_tasks([]) == {"train": [], "val": [], "test": []}
    with pytest.raises(PersonascopeError, match="unknown split"):
        split_tasks([Task("x", "Do it.", "misc", "holdout")])


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(**fields: str) -> str:
    return json.dumps(fields)


def test_user_file_with_hashed_splits(tmp_path: Path) -> None:
    lines = [row(id=f"t{i}", text=f"Task number {i}.", topic="misc") for i in range(400)]
    lines.insert(3, "")  # blank lines are skipped
    lines.append(row(id="fixed", text="Keep me in val.", topic="misc", split="val"))
    tasks = load_tasks(write(tmp_path / "tasks.jsonl", lines))
    assert len(tasks) == 401
    assert tasks[-1].split == "val"
    again = load_tasks(tmp_path / "tasks.jsonl")
    assert [t.split for t in again] == [t.split for t in tasks]
    share = Counter(t.split for t in tasks[:-1])
    assert set(share) == set(SPLITS)
    assert 0.6 < share["train"] / 400 < 0.8


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([row(id="a", text="Do A.", topic="x"), '{"id": "b", "text": '], r"line 2: not valid JSON"),
        ([row(id="a", text="Do A.", topic="x"), "[1, 2]"], r"line 2: expected a JSON object"),
        ([row(text="Do A.", topic="x")], r'line 1: "id" is missing'),
        (["", row(id="a", topic="x")], r'line 2: "text" is missing'),
        ([row(id="a", text="Do A.")], r'line 1: "topic" is missing'),
        ([row(id="a", text="  ", topic="x")], r'line 1: "text" must be a non-empty string'),
        ([row(id="a", text="Do A.", topic="x", split="dev")], r"line 1: unknown split 'dev'"),
        (
            [row(id="a", text="A.", topic="x"), row(id="b", text="B.", topic="x"), row(id="a", text="C.", topic="x")],
            r"duplicate task ids a \(lines 1, 3\)",
        ),
        ([], r"holds no tasks"),
        (["", "   "], r"holds no tasks"),
    ],
    ids=[
        "bad_json",
        "not_object",
        "no_id",
        "no_text",
        "no_topic",
        "empty_text",
        "bad_split",
        "dup_ids",
        "empty",
        "blank",
    ],
)
def test_bad_files_raise_one_line(tmp_path: Path, lines: list[str], expected: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(PersonascopeError, match=expected) as err:
        load_tasks(path)
    assert "\n" not in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(PersonascopeError, match="does not exist"):
        load_tasks(tmp_path / "nope.jsonl")
