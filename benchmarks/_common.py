"""Shared set-up for the benchmarks: the model and a deterministic set of conversations."""

from __future__ import annotations

import gc
import os
import random
import resource
import threading
import time
from collections.abc import Callable

import torch

WORDS = [
    "the",
    "model",
    "answers",
    "questions",
    "about",
    "cooking",
    "travel",
    "science",
    "history",
    "music",
    "money",
    "health",
    "sport",
    "weather",
    "friends",
    "work",
    "school",
    "books",
    "films",
    "games",
    "animals",
    "cities",
    "rivers",
    "mountains",
    "plans",
    "ideas",
    "reasons",
    "steps",
    "examples",
    "results",
]


def conversations(n: int, seed: int = 0, min_words: int = 8, max_words: int = 60) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        out.append(
            [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Question {i}: {q}?"},
                {"role": "assistant", "content": a.capitalize() + "."},
            ]
        )
    return out


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time over ``repeats`` runs (the least disturbed by other load on a shared machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def setup_threads() -> None:
    """Two torch threads (this machine's cores), or ``PERSONASCOPE_BENCH_THREADS`` when other jobs share the CPU."""
    torch.set_num_threads(int(os.environ.get("PERSONASCOPE_BENCH_THREADS", "2")))


def current_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def peak_growth(fn: Callable[[], object]) -> tuple[int, object]:
    """Peak live RSS above the level before ``fn`` ran, sampled every 2 ms (the process high-water mark would
    include model loading)."""
    gc.collect()
    base = current_rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], current_rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = fn()
    stop.set()
    sampler.join()
    return max(peak[0], current_rss()) - base, out
