from __future__ import annotations

import multiprocessing
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from personascope.judges.base import JudgeItem, JudgeResult
from personascope.judges.cache import CachedJudge, JudgeCache, cache_key
from personascope.traits import TraitSpec, load_trait


class CountingJudge:
    """Scores an item by its answer's length; answers containing "boom" fail, "none" gives no score."""

    def __init__(self, id: str = "count:v1") -> None:
        self.id = id
        self.calls: list[tuple[str, list[JudgeItem]]] = []

    def _score(self, item: JudgeItem) -> JudgeResult:
        if "boom" in item.answer:
            return JudgeResult(None, error="exploded")
        if "none" in item.answer:
            return JudgeResult(None)
        return JudgeResult(float(len(item.answer)))

    def trait_scores(self, trait: TraitSpec, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        self.calls.append((trait.name, list(items)))
        return [self._score(it) for it in items]

    def coherence_scores(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        self.calls.append(("coherence", list(items)))
        return [JudgeResult(100.0 - len(it.answer)) for it in items]

    def cache_scope(self, trait: TraitSpec | None) -> str:
        return "coherence" if trait is None else f"rubric:{hash(trait.rubric) & 0xFFFF}"


@pytest.fixture(scope="module")
def evil() -> TraitSpec:
    return load_trait("evil")


def items(*answers: str) -> list[JudgeItem]:
    return [JudgeItem("q?", a) for a in answers]


def test_hits_skip_the_inner_judge(tmp_path: Path, evil: TraitSpec) -> None:
    inner = CountingJudge()
    judge = CachedJudge(inner, JudgeCache(tmp_path / "c.sqlite"))
    first = judge.trait_scores(evil, items("a", "bb", "a"))
    assert [r.score for r in first] == [1.0, 2.0, 1.0]
    assert len(inner.calls) == 1 and [it.answer for it in inner.calls[0][1]] == ["a", "bb"]  # one batch, deduplicated
    assert (judge.hits, judge.misses) == (0, 3)
    again = judge.trait_scores(evil, items("bb", "a"))
    assert [r.score for r in again] == [2.0, 1.0]
    assert len(inner.calls) == 1
    assert (judge.hits, judge.misses) == (2, 3)
    # a mix: only the miss goes to the inner judge
    mixed = judge.trait_scores(evil, items("a", "ccc"))
    assert [r.score for r in mixed] == [1.0, 3.0]
    assert [it.answer for it in inner.calls[-1][1]] == ["ccc"]
    # a fresh wrapper on the same file (a new process, say) sees the stored scores
    other = CachedJudge(CountingJudge(), JudgeCache(tmp_path / "c.sqlite"))
    assert [r.score for r in other.trait_scores(evil, items("ccc"))] == [3.0]
    assert other.hits == 1 and not other.inner.calls  # type: ignore[attr-defined]


def test_keys_separate_judge_scope_and_kind(tmp_path: Path, evil: TraitSpec) -> None:
    cache = JudgeCache(tmp_path / "c.sqlite")
    inner = CountingJudge()
    judge = CachedJudge(inner, cache)
    judge.trait_scores(evil, items("abc"))
    assert [r.score for r in judge.coherence_scores(items("abc"))] == [97.0]  # kind is part of the key
    assert len(inner.calls) == 2
    other_judge = CachedJudge(CountingJudge("count:v2"), cache)
    other_judge.trait_scores(evil, items("abc"))
    assert other_judge.misses == 1
    humorous = load_trait("humorous")
    judge.trait_scores(humorous, items("abc"))
    assert len(inner.calls) == 3  # another rubric, another scope
    assert cache_key("j", "s", "trait", "q", "a") != cache_key("j", "s", "coherence", "q", "a")
    assert cache_key("j", "s", "trait", "q|", "a") != cache_key("j", "s", "trait", "q", "|a")


def test_errors_are_not_cached_but_none_is(tmp_path: Path, evil: TraitSpec) -> None:
    inner = CountingJudge()
    judge = CachedJudge(inner, JudgeCache(tmp_path / "c.sqlite"))
    out = judge.trait_scores(evil, items("boom", "none"))
    assert out == [JudgeResult(None, error="exploded"), JudgeResult(None)]
    out = judge.trait_scores(evil, items("boom", "none"))
    assert out == [JudgeResult(None, error="exploded"), JudgeResult(None)]
    assert [it.answer for it in inner.calls[-1][1]] == ["boom"]  # retried; the None score came from the cache
    assert len(judge.cache) == 1


def test_wal_mode(tmp_path: Path) -> None:
    cache = JudgeCache(tmp_path / "sub" / "c.sqlite")
    cache.put_many([("k", 1.0, "j", "s", "trait")])
    cache.put_many([("k", 2.0, "j", "s", "trait")])  # INSERT OR IGNORE keeps the first value
    assert cache.get_many(["k", "missing"]) == {"k": 1.0}
    cache.close()
    conn = sqlite3.connect(tmp_path / "sub" / "c.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def _worker(path: str, worker: int, rounds: int, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    evil = load_trait("evil")
    judge = CachedJudge(CountingJudge(), JudgeCache(path, timeout=30))
    for r in range(rounds):
        # half the answers are shared by both workers, half are this worker's own
        batch = items(*[f"shared {r} {i}" for i in range(10)], *[f"own {worker} {r} {i}" for i in range(10)])
        got = judge.trait_scores(evil, batch)
        assert [g.score for g in got] == [float(len(it.answer)) for it in batch]
    queue.put((worker, judge.hits, judge.misses))


@pytest.mark.skipif(sys.platform != "linux", reason="uses fork for speed")
def test_two_processes_share_the_cache(tmp_path: Path, evil: TraitSpec) -> None:
    path = str(tmp_path / "shared.sqlite")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    rounds = 15
    procs = [ctx.Process(target=_worker, args=(path, w, rounds, queue)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    reports = [queue.get(timeout=5) for _ in procs]
    assert sum(hits + misses for _, hits, misses in reports) == 2 * rounds * 20
    # every score written by either process is readable here, and nothing was lost
    inner = CountingJudge()
    judge = CachedJudge(inner, JudgeCache(path))
    everything = [f"shared {r} {i}" for r in range(rounds) for i in range(10)]
    everything += [f"own {w} {r} {i}" for w in range(2) for r in range(rounds) for i in range(10)]
    out = judge.trait_scores(evil, items(*everything))
    assert not inner.calls and judge.hits == len(everything)
    assert [o.score for o in out] == [float(len(a)) for a in everything]
