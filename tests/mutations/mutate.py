"""Mutation check: inject plausible bugs one at a time into a copy of the source and assert the fast suite fails.

Run with ``make mutate`` (not part of ``make test``). For every mutant below the script copies ``src/``, ``tests/``
and ``pyproject.toml`` to a temporary folder, replaces one exact piece of source text (it must occur exactly once,
so a mutant that no longer matches the code is reported as *stale* instead of silently passing), and runs the fast
suite there (``-m "not slow" -x``, the tests most likely to catch it first, then all the others). The mutant is
*caught* when a test fails. A mutant that survives, is stale, or breaks collection makes the script exit 1.

First the unmutated copy runs the whole fast suite, so a suite that fails in the copy (a missing file, a broken
test) cannot make every mutant look caught.

    .venv/bin/python tests/mutations/mutate.py            # all mutants
    .venv/bin/python tests/mutations/mutate.py -k ablate  # those whose name contains "ablate"
    .venv/bin/python tests/mutations/mutate.py --list
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to src/personascope
    edits: tuple[tuple[str, str], ...]  # (exact old text, new text), each old text occurring exactly once
    focus: tuple[str, ...] = field(default=())  # test paths run first (the rest of the fast suite follows)


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "last prompt token's role one token early (capture / scoring roles)",
        "residual/capture.py",
        (("    roles[-1] = PROMPT_LAST\n", "    roles[-2] = PROMPT_LAST\n"),),
        ("tests/residual/test_interventions.py", "tests/residual/test_positions.py"),
    ),
    Mutant(
        "last prompt token's role one token early (generation)",
        "generation.py",
        (
            (
                "prompt_roles = [[PROMPT] * (len(p) - 1) + [PROMPT_LAST] for p in prompts]",
                "prompt_roles = [[PROMPT] * (len(p) - 2) + [PROMPT_LAST, PROMPT] for p in prompts]",
            ),
        ),
        ("tests/test_generation.py",),
    ),
    Mutant(
        "generated tokens not tagged as response",
        "generation.py",
        (
            (
                "step_roles = torch.full((batch, 1), RESPONSE, dtype=torch.long, device=device)",
                "step_roles = torch.full((batch, 1), OTHER, dtype=torch.long, device=device)",
            ),
            (
                "from personascope.residual.positions import PROMPT,",
                "from personascope.residual.positions import OTHER, PROMPT,",
            ),
        ),
        ("tests/test_generation.py",),
    ),
    Mutant(
        "cached decode steps not steered",
        "generation.py",
        (
            (
                "        step_roles,\n                row_index,\n",
                "        step_roles if step_ids.shape[1] > 1 else step_roles * 0,\n                row_index,\n",
            ),
        ),
        ("tests/test_generation.py",),
    ),
    Mutant(
        "response mask includes the last prompt token",
        "residual/positions.py",
        (('    "response": (RESPONSE,),', '    "response": (PROMPT_LAST, RESPONSE),'),),
        ("tests/residual/test_positions.py", "tests/residual/test_interventions.py"),
    ),
    Mutant(
        "interventions one layer too deep",
        "residual/interventions.py",
        (
            (
                "{layer: _site_fn(model, items) for layer, items in by_layer.items()}",
                "{min(layer + 1, model.num_layers): _site_fn(model, items) for layer, items in by_layer.items()}",
            ),
        ),
        ("tests/test_generation.py", "tests/residual/test_interventions.py"),
    ),
    Mutant(
        "Ablate wipes the whole residual",
        "residual/interventions.py",
        (("        return h - _masked((h @ u).unsqueeze(-1) * u, mask)", "        return h - _masked(h, mask)"),),
        ("tests/residual/test_interventions.py",),
    ),
    Mutant(
        "Ablate ignores its positions",
        "residual/interventions.py",
        (("return h - _masked((h @ u).unsqueeze(-1) * u, mask)", "return h - (h @ u).unsqueeze(-1) * u"),),
        ("tests/residual/test_interventions.py",),
    ),
    Mutant(
        "Cap moves the orthogonal complement too",
        "residual/interventions.py",
        (("return h + _masked(shift * u, mask)", "return h + _masked(shift * u + 1e-3 * shift, mask)"),),
        ("tests/residual/test_interventions.py",),
    ),
    Mutant(
        "Cap sides swapped",
        "residual/interventions.py",
        (('        if self.side == "upper":', '        if self.side == "lower":'),),
        ("tests/residual/test_interventions.py",),
    ),
    Mutant(
        "contrast judge's score difference always 0",
        "judges/local.py",
        (("        delta = lp[: len(keep)] - lp[len(keep) :]", "        delta = lp[: len(keep)] - lp[: len(keep)]"),),
        ("tests/judges/test_local.py",),
    ),
    Mutant(
        "contrast judge's personas swapped",
        "judges/local.py",
        (("        delta = lp[: len(keep)] - lp[len(keep) :]", "        delta = lp[len(keep) :] - lp[: len(keep)]"),),
        ("tests/judges/test_local.py",),
    ),
    Mutant(
        "likelihood coherence sign flipped",
        "judges/local.py",
        (
            (
                "scores = 100.0 * torch.sigmoid((lp.double() - center) / width)",
                "scores = 100.0 * torch.sigmoid((center - lp.double()) / width)",
            ),
        ),
        ("tests/judges/test_local.py",),
    ),
    Mutant(
        "logprob judge's expected value not normalised",
        "judges/base.py",
        (("    return weighted / mass\n", "    return weighted\n"),),
        ("tests/judges/test_base.py", "tests/judges/test_local.py"),
    ),
    Mutant(
        "response log-likelihood off by one token",
        "likelihood.py",
        (
            (
                "step = logits[b, start - 1 - offset : end - 1 - offset].float().log_softmax(dim=-1)",
                "step = logits[b, start - offset : end - offset].float().log_softmax(dim=-1)",
            ),
        ),
        ("tests/test_likelihood.py", "tests/judges/test_local.py"),
    ),
    Mutant(
        "capture one layer off",
        "residual/capture.py",
        (
            (
                "site_hooks(model, {layer: make_fn(i, layer) for i, layer in enumerate(layer_list)})",
                "site_hooks(model, {max(layer - 1, 0): make_fn(i, layer) for i, layer in enumerate(layer_list)})",
            ),
        ),
        ("tests/residual/test_capture.py",),
    ),
    Mutant(
        "response_mean includes the end-of-turn token",
        "residual/capture.py",
        (
            (
                '    if reduction == "response_mean":\n        if conv.response is None:\n'
                '            raise PersonascopeError("response_mean needs a trailing assistant message")\n'
                "        return conv.response\n",
                '    if reduction == "response_mean":\n        if conv.response is None:\n'
                '            raise PersonascopeError("response_mean needs a trailing assistant message")\n'
                "        return conv.response[0], conv.response[1] + 1\n",
            ),
        ),
        ("tests/residual/test_capture.py",),
    ),
    Mutant(
        "projection directions not normalised",
        "residual/capture.py",
        (('    return (d / norms.masked_fill(zero, float("nan"))).float()', "    return d.float()"),),
        ("tests/residual/test_capture.py", "tests/pipelines/test_monitor.py"),
    ),
    Mutant(
        "wrong sign in the mean difference",
        "pipelines/extract.py",
        (
            (
                'diff = acts["pos"][method].mean(0) - acts["neg"][method].mean(0)',
                'diff = acts["neg"][method].mean(0) - acts["pos"][method].mean(0)',
            ),
        ),
        ("tests/pipelines/test_extract.py",),
    ),
    Mutant(
        "filter thresholds inverted",
        "pipelines/extract.py",
        (
            ('        return bool(score["trait"] >= theta)', '        return bool(score["trait"] < theta)'),
            ('    return bool(score["trait"] < 100 - theta)', '    return bool(score["trait"] >= 100 - theta)'),
        ),
        ("tests/pipelines/test_extract.py",),
    ),
    Mutant(
        "coherence filter ignored",
        "pipelines/extract.py",
        (('    if score["coherence"] < cfg.coherence_threshold:\n        return False\n', ""),),
        ("tests/pipelines/test_extract.py",),
    ),
    Mutant(
        "resume re-appends finished jobs",
        "pipelines/common.py",
        (
            (
                "for i, j in enumerate(jobs[start : start + chunk]) if j.key not in done]",
                "for i, j in enumerate(jobs[start : start + chunk])]",
            ),
        ),
        ("tests/pipelines/test_extract.py", "tests/test_runs.py"),
    ),
    Mutant(
        "records not de-duplicated by key",
        "runs.py",
        (("            if key not in seen:\n", "            if True:\n"),),
        ("tests/test_runs.py",),
    ),
    Mutant(
        "per-row coefficients ignore the row index",
        "residual/interventions.py",
        (("        c = c[rows.to(c.device)]\n", "        c = c[: rows.numel()]\n"),),
        ("tests/residual/test_interventions.py", "tests/test_generation.py"),
    ),
    Mutant(
        "every conversation samples with the same seed",
        "generation.py",
        (
            (
                "else [seed + i for i in range(len(conversations))]",
                "else [seed for i in range(len(conversations))]",
            ),
        ),
        ("tests/test_generation.py",),
    ),
)


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".mypy_cache", ".ruff_cache", ".pytest_cache")
    shutil.copytree(ROOT / "src", dest / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    shutil.copy2(ROOT / "README.md", dest / "README.md")  # the README's snippets are tested too
    shutil.copytree(ROOT / "docs", dest / "docs", ignore=ignore)


def _apply(mutant: Mutant, dest: Path) -> str | None:
    """Apply the mutant's edits in ``dest``; the reason it cannot be applied, or None."""
    path = dest / "src" / "personascope" / mutant.file
    text = path.read_text()
    for old, new in mutant.edits:
        n = text.count(old)
        if n != 1:
            return f"{mutant.file}: the text to mutate occurs {n} times (expected once): {old.strip()[:60]!r}"
        text = text.replace(old, new)
    path.write_text(text)
    return None


def _pytest(dest: Path, paths: list[str], timeout: float, first_failure: bool = True) -> tuple[int, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(dest / "src"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-m", "not slow", "-p", "no:cacheprovider", "--no-header"]
    if first_failure:
        cmd.append("-x")
    try:
        proc = subprocess.run(
            [*cmd, *paths], cwd=dest, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    return proc.returncode, proc.stdout + proc.stderr


def _first_failure(output: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
    if m:
        return m.group(1)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return "? " + (lines[-1][:120] if lines else "no output")


def _existing(paths: tuple[str, ...] | list[str], dest: Path) -> list[str]:
    return [p for p in paths if (dest / p.split("::")[0]).exists()]


def run_mutant(mutant: Mutant, timeout: float) -> tuple[str, str, float]:
    """(outcome, detail, seconds) with outcome one of caught / SURVIVED / STALE / BROKEN."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="personascope-mutant-") as tmp:
        dest = Path(tmp)
        _copy_tree(dest)
        problem = _apply(mutant, dest)
        if problem is not None:
            return "STALE", problem, time.perf_counter() - started
        rc, out = _pytest(dest, [*_existing(mutant.focus, dest), "tests"], timeout)
    seconds = time.perf_counter() - started
    if rc == 1:
        return "caught", _first_failure(out), seconds
    if rc == 0:
        return "SURVIVED", "the fast suite passed", seconds
    tail = out.strip().splitlines()[-1] if out.strip() else ""
    return "BROKEN", f"pytest exit {rc}: {tail[:100]}", seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only mutants whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the focus tests")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant (default 900)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.k.lower() in m.name.lower()]
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{m.file}]")
        return 0
    if not chosen:
        print(f"no mutant matches -k {args.k!r}", file=sys.stderr)
        return 2
    if not args.no_baseline:
        with tempfile.TemporaryDirectory(prefix="personascope-baseline-") as tmp:
            dest = Path(tmp)
            _copy_tree(dest)
            rc, out = _pytest(dest, ["tests"], args.timeout, first_failure=False)
        if rc != 0:
            print(out[-3000:])
            print(
                f"baseline: the unmutated fast suite fails in the copy (pytest exit {rc}); fix it first",
                file=sys.stderr,
            )
            return 1
        print("baseline: the unmutated fast suite passes in the copy")
    rows = []
    for i, mutant in enumerate(chosen, 1):
        outcome, detail, seconds = run_mutant(mutant, args.timeout)
        rows.append((mutant, outcome, detail, seconds))
        print(f"[{i}/{len(chosen)}] {outcome:8s} {mutant.name}  ({seconds:.0f} s)  {detail}", flush=True)
    print()
    print("| injected bug | file | result | first failing test |")
    print("|---|---|---|---|")
    for mutant, outcome, detail, _ in rows:
        print(f"| {mutant.name} | `{mutant.file}` | {outcome} | `{detail}` |")
    bad = [r for r in rows if r[1] != "caught"]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} mutants caught")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
