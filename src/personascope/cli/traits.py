"""`personascope traits list | show | new`: browse built-in trait specs and draft new ones with an LLM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from personascope.errors import PersonascopeError

traits_app = typer.Typer(help="Trait specs: list, show, new.", no_args_is_help=True)


@traits_app.command("list")
def traits_list() -> None:
    """List the built-in traits with their description and sizes."""
    from personascope.traits import builtin_traits, load_trait

    typer.echo(f"{'name':<16} {'pairs':>5} {'extract':>7} {'eval':>5} {'ladder':>6}  description")
    for name in builtin_traits():
        spec = load_trait(name)
        typer.echo(
            f"{name:<16} {len(spec.instruction_pairs):>5} {len(spec.extraction_questions):>7} "
            f"{len(spec.evaluation_questions):>5} {len(spec.monitor_ladder):>6}  {spec.description}"
        )


@traits_app.command("show")
def traits_show(
    trait: Annotated[str, typer.Argument(help="Built-in trait name or a trait file (.json/.yaml).")],
) -> None:
    """Print a trait spec as JSON."""
    from personascope.traits import load_trait

    typer.echo(json.dumps(load_trait(trait).to_dict(), indent=2, ensure_ascii=False))


@traits_app.command("new")
def traits_new(
    name: Annotated[str, typer.Argument(help="Trait name: lowercase letters, digits, '_' or '-'.")],
    description: Annotated[str, typer.Option("--description", "-d", help="One sentence describing the trait.")],
    generator: Annotated[
        str, typer.Option("--generator", "-g", help="openai:MODEL (OPENAI_BASE_URL/OPENAI_API_KEY) or hf:MODEL.")
    ],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the spec (default: NAME.json).")] = (
        None
    ),
    pairs: Annotated[int, typer.Option(help="Instruction pairs to ask for.")] = 5,
    questions: Annotated[int, typer.Option(help="Questions per set (extraction and evaluation).")] = 20,
    attempts: Annotated[int, typer.Option(help="Replies to try, counting repairs.")] = 3,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
    device: Annotated[str | None, typer.Option(help="torch device for hf: generators.")] = None,
) -> None:
    """Draft a new trait spec with an LLM, validate it (asking for repairs) and write it as JSON."""
    from personascope.traits.generate import generate_trait_spec

    target = out if out is not None else Path(f"{name}.json")
    if target.suffix.lower() != ".json":
        raise PersonascopeError(f"--out must be a .json file, got {target}")
    if target.exists() and not overwrite:
        raise PersonascopeError(f"{target} already exists; choose another --out or pass --overwrite")
    model = None
    if generator.startswith("hf:") and device is not None:
        from personascope.models.loading import load_model

        model = load_model(generator[3:], device=device)
    spec = generate_trait_spec(
        name,
        description,
        generator,
        n_pairs=pairs,
        n_questions=questions,
        max_attempts=attempts,
        model=model,
        log=lambda line: typer.echo(line, err=True),
    )
    spec.save(target)
    typer.echo(
        f"wrote {target} ({len(spec.instruction_pairs)} pairs, {len(spec.extraction_questions)} + "
        f"{len(spec.evaluation_questions)} questions, ladder of {len(spec.monitor_ladder)}); review it before use"
    )
