"""Projection mode (monitoring at scale) against full capture, as ratios measured in one run.

Each measurement runs in a fresh process that loads the model, then captures the response-mean activation at every
layer of N conversations either in full (``[N, num_layers + 1, hidden]``) or projected on a persona vector's unit
directions (``[N, num_layers + 1]``, what ``personascope.project`` returns). Reported: throughput of projection ÷
full capture, and the live memory each needs above the loaded model, at two sizes of N — projection memory should
stay flat as N grows (it holds one batch's activations and a small result; a warm-up batch runs first, outside
the measurement), full capture grows with
N × layers × hidden.

Run: ``.venv/bin/python benchmarks/bench_projection.py [--model ALIAS] [--n 5000] [--small-n 1000]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import conversations, peak_growth, setup_threads

import personascope as ps


def child(model_name: str, n: int, mode: str, batch_size: int) -> None:
    model = ps.load_model(model_name)
    convs = conversations(n, seed=1, min_words=8, max_words=40)
    torch.manual_seed(0)
    vector = ps.PersonaVector.for_model(model, torch.randn(model.num_layers + 1, model.hidden_size), trait="bench")

    def run() -> torch.Tensor:
        if mode == "projection":
            return ps.project(model, convs, vector, at="response_mean", batch_size=batch_size, progress=False)
        return ps.capture(model, convs, reductions=["response_mean"], batch_size=batch_size, progress=False)[
            "response_mean"
        ]

    warm = convs[:batch_size]  # the first forward pass allocates caches and thread pools: keep that out
    ps.project(model, warm, vector, at="response_mean", batch_size=batch_size, progress=False)
    start = time.perf_counter()
    growth, result = peak_growth(run)
    seconds = time.perf_counter() - start
    assert isinstance(result, torch.Tensor)
    print(json.dumps({"n": n, "mode": mode, "seconds": seconds, "growth": growth, "result": result.numel() * 4}))


def measure(model_name: str, n: int, mode: str, batch_size: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", mode, "--model", model_name, "--n", str(n)]
    proc = subprocess.run([*cmd, "--batch-size", str(batch_size)], capture_output=True, text=True, check=True)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--small-n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--child", choices=["projection", "full"])
    args = parser.parse_args()
    setup_threads()
    if args.child:
        child(args.model, args.n, args.child, args.batch_size)
        return
    mib = 2**20
    rows = {
        (n, mode): measure(args.model, n, mode, args.batch_size)
        for n in (args.small_n, args.n)
        for mode in ("projection", "full")
    }
    print(f"model {args.model}, response mean at every layer, batch {args.batch_size}, one fresh process each:")
    for (n, mode), r in rows.items():
        print(
            f"  {mode:<10} N={n:<6} {r['seconds']:8.1f} s  {n / r['seconds']:7.1f} conv/s  "
            f"peak growth {r['growth'] / mib:8.1f} MiB  result {r['result'] / mib:8.2f} MiB"
        )
    big, small = args.n, args.small_n
    p, f = rows[(big, "projection")], rows[(big, "full")]
    print(f"RATIO projection / full capture throughput, N={big}: {f['seconds'] / p['seconds']:.3f}  (goal >= 1)")
    print(f"RATIO projection peak growth / full capture peak growth, N={big}: {p['growth'] / f['growth']:.3f}")
    ps_, fs = rows[(small, "projection")], rows[(small, "full")]
    print(
        f"RATIO peak growth N={big} / N={small}: projection {p['growth'] / max(ps_['growth'], 1):.3f}, "
        f"full capture {f['growth'] / max(fs['growth'], 1):.3f}  "
        f"(data ratio {big / small:.1f}; projection should stay ~1)"
    )


if __name__ == "__main__":
    main()
