"""Capture throughput and memory, as ratios measured in one run.

1. capture (all layers, response mean) ÷ a bare batched forward on the same batches (goal ≥ 0.95), against both
   the full causal-LM forward and the backbone alone (no LM head);
2. capture ÷ the per-sample ``output_hidden_states`` approach of the persona-vector paper's reference code;
3. peak memory of capture over 1,000 conversations (in a fresh process) against model + result + a few batches.

Run: ``.venv/bin/python benchmarks/bench_capture.py [--model ALIAS] [--n 64] [--memory-n 1000]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_of, conversations, peak_growth, setup_threads

import personascope as ps
from personascope.residual.capture import _pack, format_all, length_batches, reduction_span


def throughput(model_name: str, n: int, batch_size: int, repeats: int) -> None:
    model = ps.load_model(model_name)
    convs = conversations(n)
    formatted = format_all(model, convs)
    batches = length_batches([len(c) for c in formatted], batch_size)
    spans = [[reduction_span(c, "response_mean")] for c in formatted]
    pad = int(model.tokenizer.pad_token_id)
    packed = [_pack(formatted, rows, spans, pad, model.device)[:2] for rows in batches]
    tokens = sum(len(c) for c in formatted)
    backbone = model.hf_model.get_decoder()

    @torch.no_grad()
    def bare_full() -> None:
        for ids, mask in packed:
            model.hf_model(input_ids=ids, attention_mask=mask, use_cache=False)

    @torch.no_grad()
    def bare_backbone() -> None:
        for ids, mask in packed:
            backbone(input_ids=ids, attention_mask=mask, use_cache=False)

    def ours() -> None:
        ps.capture(model, formatted, reductions=["response_mean"], batch_size=batch_size, progress=False)

    @torch.no_grad()
    def reference_per_sample() -> None:  # the paper's approach: one sample at a time, all hidden states kept
        for f in formatted:
            out = model.hf_model(input_ids=torch.tensor([f.input_ids]), output_hidden_states=True)
            s, e = f.response  # type: ignore[misc]
            torch.stack([h[0, s:e].mean(0) for h in out.hidden_states])

    ours()  # warm-up
    t_full, t_backbone, t_ours, t_ref = (
        best_of(fn, repeats) for fn in (bare_full, bare_backbone, ours, reference_per_sample)
    )
    print(f"model {model_name}: {n} conversations, {tokens} tokens, batch {batch_size}, best of {repeats}")
    for label, t in (
        ("bare forward (causal LM)", t_full),
        ("bare forward (backbone)", t_backbone),
        ("capture", t_ours),
        ("per-sample output_hidden_states", t_ref),
    ):
        print(f"  {label:<34} {t:7.3f} s   {tokens / t:8.0f} tok/s")
    print(f"RATIO capture / bare causal-LM forward throughput: {t_full / t_ours:.3f}  (goal >= 0.95)")
    print(f"RATIO capture / bare backbone forward throughput:  {t_backbone / t_ours:.3f}")
    print(f"RATIO capture / per-sample output_hidden_states:   {t_ref / t_ours:.3f}")
    print(f"RATIO per-sample reference / bare causal-LM forward: {t_full / t_ref:.3f}")


def memory_child(model_name: str, n: int, batch_size: int) -> None:
    model = ps.load_model(model_name)
    formatted = format_all(model, conversations(n))
    batches = length_batches([len(c) for c in formatted], batch_size)
    ids, mask = _pack(
        formatted,
        batches[0],
        [[reduction_span(c, "response_mean")] for c in formatted],
        int(model.tokenizer.pad_token_id),
        model.device,
    )[:2]
    with torch.no_grad():
        one_batch, _ = peak_growth(lambda: model.hf_model(input_ids=ids, attention_mask=mask, use_cache=False))
    growth, result = peak_growth(
        lambda: ps.capture(model, formatted, reductions=["response_mean"], batch_size=batch_size, progress=False)
    )
    assert isinstance(result, dict)
    stats = {
        "n": n,
        "growth": growth,
        "one_batch_forward": one_batch,
        "result": result["response_mean"].numel() * 4,
        "naive_all_hidden_states": sum(len(c) for c in formatted) * (model.num_layers + 1) * model.hidden_size * 4,
    }
    print(json.dumps(stats))


def memory(model_name: str, n: int, batch_size: int) -> None:
    cmd = [sys.executable, __file__, "--memory-child", "--model", model_name, "--memory-n", str(n)]
    proc = subprocess.run([*cmd, "--batch-size", str(batch_size)], capture_output=True, text=True, check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 2**20
    print(f"memory, {r['n']} conversations, batch {batch_size} (fresh process, live RSS above the loaded model):")
    print(f"  capture peak growth          {r['growth'] / mib:8.1f} MiB")
    print(f"  result tensor                {r['result'] / mib:8.1f} MiB")
    print(f"  one bare forward, 1st batch  {r['one_batch_forward'] / mib:8.1f} MiB (the longest batch)")
    print(
        f"  all hidden states, all layers{r['naive_all_hidden_states'] / mib:8.1f} MiB (what keeping them would need)"
    )
    bound = r["result"] + 2 * r["one_batch_forward"]
    print(f"RATIO capture growth / (result + 2 batches' forward): {r['growth'] / bound:.3f}  (goal <= 1)")
    print(f"RATIO capture growth / all-hidden-states size:        {r['growth'] / r['naive_all_hidden_states']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-n", type=int, default=1000)
    parser.add_argument("--memory-child", action="store_true")
    args = parser.parse_args()
    setup_threads()
    if args.memory_child:
        memory_child(args.model, args.memory_n, args.batch_size)
        return
    throughput(args.model, args.n, args.batch_size, args.repeats)
    memory(args.model, args.memory_n, args.batch_size)


if __name__ == "__main__":
    main()
