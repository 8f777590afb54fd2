"""A persistent SQLite cache of judge scores, safe to share between processes.

The key of a score is the SHA-256 of (judge id, cache scope, kind ``"trait"``/``"coherence"``, question, answer),
so a score is reused only by the same judge with the same rubric / judge pair for the same text. ``None`` scores
(the judge looked and found no number) are stored; results with an ``error`` are not, so a later run retries them.

The database runs in WAL mode (readers never block writers), waits up to ``timeout`` seconds for a lock, and writes
with ``INSERT OR IGNORE`` (two processes that score the same item concurrently both keep the first value). Each
process and each thread gets its own connection, opened on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from personascope.errors import PersonascopeError
from personascope.judges.base import Judge, JudgeItem, JudgeResult
from personascope.traits import TraitSpec

__all__ = ["CachedJudge", "JudgeCache", "cache_key"]

Kind = Literal["trait", "coherence"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    key TEXT PRIMARY KEY,
    score REAL,
    judge TEXT NOT NULL,
    scope TEXT NOT NULL,
    kind TEXT NOT NULL,
    created REAL NOT NULL
)
"""
_CHUNK = 500  # keys per SELECT (well under SQLite's variable limit)


def cache_key(judge_id: str, scope: str, kind: str, question: str, answer: str) -> str:
    """The cache key of one score (hex SHA-256 of the five fields, unambiguously joined)."""
    blob = json.dumps([judge_id, scope, kind, question, answer], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """Judge scores in an SQLite file at ``path`` (created with its folder on first use)."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 60.0) -> None:
        self.path = Path(path).expanduser()
        self.timeout = timeout
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"JudgeCache({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            return conn
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(_SCHEMA)
        except sqlite3.Error as exc:
            raise PersonascopeError(
                f"cannot open the judge cache {self.path} ({exc}); pass another path or disable the cache"
            ) from None
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        """Close this thread's connection (it reopens on next use)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            conn.close()
        self._local.conn = None

    def get_many(self, keys: Sequence[str]) -> dict[str, float | None]:
        """Stored scores for those ``keys`` that are present (a stored ``None`` is present)."""
        conn = self._connect()
        found: dict[str, float | None] = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), _CHUNK):
            chunk = unique[i : i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for key, score in conn.execute(f"SELECT key, score FROM scores WHERE key IN ({marks})", chunk):
                found[key] = None if score is None else float(score)
        return found

    def put_many(self, rows: Iterable[tuple[str, float | None, str, str, str]]) -> None:
        """Store ``(key, score, judge_id, scope, kind)`` rows; keys already present keep their first value."""
        now = time.time()
        data = [(k, s, j, sc, kd, now) for k, s, j, sc, kd in rows]
        if not data:
            return
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT OR IGNORE INTO scores (key, score, judge, scope, kind, created) VALUES (?, ?, ?, ?, ?, ?)",
                data,
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def __len__(self) -> int:
        row = self._connect().execute("SELECT COUNT(*) FROM scores").fetchone()
        return int(row[0])


class CachedJudge:
    """Wraps a judge with a :class:`JudgeCache`; implements the same :class:`~personascope.judges.Judge` protocol.

    Hits return without calling ``inner``; all misses of a call go to ``inner`` in one batch (identical items
    once). Results with an ``error`` are returned but not stored. ``hits`` and ``misses`` count items served
    from the cache and sent to ``inner``.
    """

    def __init__(self, inner: Judge, cache: JudgeCache) -> None:
        self.inner = inner
        self.cache = cache
        self.id = inner.id
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"CachedJudge({self.inner!r}, {self.cache!r})"

    def cache_scope(self, trait: TraitSpec | None) -> str:
        return self.inner.cache_scope(trait)

    def trait_scores(self, trait: TraitSpec, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return self._scores("trait", trait, items)

    def coherence_scores(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return self._scores("coherence", None, items)

    def _scores(self, kind: Kind, trait: TraitSpec | None, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        if not items:
            return []
        scope = self.inner.cache_scope(trait)
        keys = [cache_key(self.id, scope, kind, it.question, it.answer) for it in items]
        stored: Mapping[str, float | None] = self.cache.get_many(keys)
        miss_keys = [k for k in dict.fromkeys(keys) if k not in stored]
        first_item = {k: it for k, it in reversed(list(zip(keys, items, strict=True)))}
        fresh: dict[str, JudgeResult] = {}
        if miss_keys:
            batch = [first_item[k] for k in miss_keys]
            results = self.inner.coherence_scores(batch) if trait is None else self.inner.trait_scores(trait, batch)
            if len(results) != len(batch):
                raise RuntimeError(f"judge {self.id} returned {len(results)} results for {len(batch)} items")
            fresh = dict(zip(miss_keys, results, strict=True))
            self.cache.put_many((k, r.score, self.id, scope, kind) for k, r in fresh.items() if r.error is None)
        self.hits += sum(1 for k in keys if k in stored)
        self.misses += sum(1 for k in keys if k not in stored)
        return [JudgeResult(stored[k]) if k in stored else fresh[k] for k in keys]
