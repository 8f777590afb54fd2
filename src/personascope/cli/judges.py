"""``personascope judges …``: validate a judge against the built-in labelled answers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

judges_app = typer.Typer(help="Judges: validate against labelled answers.", no_args_is_help=True)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@judges_app.command("validate")
def validate(
    judge: Annotated[
        str,
        typer.Option("--judge", "-j", help="none | contrast:MODEL | hf:MODEL | openai:MODEL"),
    ] = "contrast:smollm2-135m-instruct",
    trait: Annotated[
        list[str] | None,
        typer.Option("--trait", "-t", help="Built-in trait to validate (repeat for several; default: all)."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the rows as JSON to this file.")] = None,
    cache: Annotated[bool, typer.Option(help="Use the judge score cache.")] = True,
) -> None:
    """Score each trait's labelled answers and print AUROC and mean scores per class."""
    from personascope.errors import PersonascopeError
    from personascope.judges import make_judge, validate_judge
    from personascope.traits import builtin_traits

    known = builtin_traits()
    for name in trait or []:
        if name not in known:
            raise PersonascopeError(f"unknown built-in trait {name!r}; use one of: {', '.join(known)}")
    start = time.perf_counter()
    scorer = make_judge(judge, cache=cache)
    rows = validate_judge(scorer, list(trait) if trait else None)
    elapsed = time.perf_counter() - start
    typer.echo(f"judge: {scorer.id}")
    typer.echo(f"{'trait':<16} {'n':>4} {'scored':>6} {'AUROC':>6} {'mean+':>6} {'mean-':>6} {'coher.':>6}")
    for row in rows:
        typer.echo(
            f"{row['trait']:<16} {row['n']:>4} {row['n_scored']:>6} {_fmt(row['auroc'], '.3f'):>6} "
            f"{_fmt(row['mean_pos'], '.1f'):>6} {_fmt(row['mean_neg'], '.1f'):>6} "
            f"{_fmt(row['coherence_mean'], '.1f'):>6}"
        )
    aurocs = [r["auroc"] for r in rows if r["auroc"] is not None]
    if aurocs:
        typer.echo(f"{'mean':<16} {'':>4} {'':>6} {sum(aurocs) / len(aurocs):>6.3f}")
    hits, misses = getattr(scorer, "hits", None), getattr(scorer, "misses", None)
    cached = f"; cache hits {hits}, misses {misses}" if hits is not None else ""
    typer.echo(f"time: {elapsed:.1f} s{cached}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
