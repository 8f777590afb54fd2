"""Steered ÷ unsteered generation speed (tokens/s), measured in one run. Goal ≥ 0.97.

Both runs generate greedily for a fixed number of new tokens with end-of-turn stopping disabled by using the
same prompts; the steered run adds a vector at one layer on every position (``all``) and, separately, on the
paper's ``last_prompt_and_response`` positions.

Run: ``.venv/bin/python benchmarks/bench_generation.py [--model ALIAS] [--n 16] [--tokens 48]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import setup_threads

import personascope as ps

PROMPTS = [
    "Tell me about the history of bread.",
    "How do volcanoes form?",
    "Give me tips for a job interview.",
    "What makes a good friend?",
    "Explain how a bicycle works.",
    "Describe a walk in the forest.",
    "Why is the sky blue?",
    "What should I cook tonight?",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    setup_threads()
    model = ps.load_model(args.model)
    convs = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(args.n)]
    torch.manual_seed(0)
    v = torch.randn(model.hidden_size)
    layer = model.num_layers // 2
    configs = {
        "unsteered": [],
        "steered (all)": [ps.Add(v, layer, 1.0, "all")],
        "steered (last_prompt_and_response)": [ps.Add(v, layer, 1.0, "last_prompt_and_response")],
    }
    rates: dict[str, float] = {}
    import time

    for _ in range(args.rounds):  # interleave the configurations so machine noise hits them alike
        for name, interventions in configs.items():
            start = time.perf_counter()
            gens = ps.generate(
                model, convs, max_new_tokens=args.tokens, temperature=0, interventions=interventions, batch_size=args.n
            )
            elapsed = time.perf_counter() - start
            tokens = sum(len(g.response_ids) for g in gens)
            rates[name] = max(rates.get(name, 0.0), tokens / elapsed)
    for name, rate in rates.items():
        print(f"  {name:<36} {rate:8.1f} new tok/s (best of {args.rounds})")
    for name in list(configs)[1:]:
        print(f"RATIO {name} / unsteered tokens/s: {rates[name] / rates['unsteered']:.3f}  (goal >= 0.97)")


if __name__ == "__main__":
    main()
