"""`personascope extract | sweep | steer`: persona vectors from trait to validated steering."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from personascope.errors import PersonascopeError

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Bundled alias, hub id, model directory or .gguf file.")]
JudgeOpt = Annotated[
    str | None, typer.Option(help="none | contrast:MODEL | hf:MODEL | openai:MODEL (default: contrast:<model>).")
]


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PersonascopeError(f"{flag} takes comma-separated numbers, got '{text}'") from None


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PersonascopeError(f"{flag} takes comma-separated integers, got '{text}'") from None


def extract(
    trait: Annotated[str, typer.Argument(help="Built-in trait name or a trait spec file (.json/.yaml).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory (default: runs/extract-TRAIT).")
    ] = None,
    model: ModelOpt = "smollm2-135m-instruct",
    judge: JudgeOpt = None,
    profile: Annotated[
        str, typer.Option(help="quick (CPU demo) | paper (5 pairs × 20 questions × 10 samples).")
    ] = "quick",
    samples_per_question: Annotated[int | None, typer.Option()] = None,
    questions: Annotated[int | None, typer.Option(help="How many extraction questions to use.")] = None,
    pairs: Annotated[int | None, typer.Option(help="How many instruction pairs to use.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option()] = None,
    temperature: Annotated[float, typer.Option()] = 1.0,
    threshold: Annotated[float | None, typer.Option(help="Trait threshold θ (keep pos ≥ θ, neg < 100−θ).")] = None,
    coherence_threshold: Annotated[float, typer.Option()] = 50.0,
    min_kept: Annotated[int, typer.Option(help="Fewest kept rollouts per side to build a vector.")] = 2,
    seed: Annotated[int, typer.Option()] = 0,
    batch_size: Annotated[int, typer.Option()] = 16,
    overwrite: Annotated[bool, typer.Option(help="Start afresh instead of resuming.")] = False,
    from_step: Annotated[
        str | None, typer.Option("--from", help="Redo this step and the ones after it: rollouts|scores|filter|vectors.")
    ] = None,
) -> None:
    """Extract persona vectors for a trait (resumes an interrupted run in the same --out).

    On a finished run, changed settings redo only the steps they feed: a new --threshold re-filters and re-averages
    without generating or judging again; a new --temperature redoes the rollouts (old outputs go to stale/).
    """
    from personascope.pipelines.extract import ExtractConfig
    from personascope.pipelines.extract import extract as run_extract

    cfg = ExtractConfig(
        trait=trait,
        model=model,
        judge=judge,
        profile=profile,
        n_pairs=pairs,
        n_questions=questions,
        samples_per_question=samples_per_question,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        threshold=threshold,
        coherence_threshold=coherence_threshold,
        min_kept=min_kept,
        seed=seed,
        batch_size=batch_size,
    )
    name = Path(trait).stem
    say = lambda line: typer.echo(line, err=True)  # noqa: E731
    target = out or Path("runs") / f"extract-{name}"
    result = run_extract(cfg, target, overwrite=overwrite, rerun_from=from_step, say=say)
    typer.echo(
        f"kept pos {result.kept['pos']}, neg {result.kept['neg']} of {result.n_rollouts // 2} rollouts each; "
        f"mean trait score pos {_fmt(result.trait_means['pos'])}, neg {_fmt(result.trait_means['neg'])}"
    )
    for method, path in result.vectors.items():
        typer.echo(f"{method:<14} {path}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def sweep(
    vector: Annotated[Path, typer.Argument(help="PersonaVector file from `personascope extract`.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory (default: next to the vector).")
    ] = None,
    model: ModelOpt = "smollm2-135m-instruct",
    judge: JudgeOpt = None,
    layers: Annotated[str | None, typer.Option(help="Comma-separated layers (default: 1/3, 1/2, 2/3 depth).")] = None,
    coefs: Annotated[str, typer.Option(help="Comma-separated coefficients.")] = "-6,-4,-2,0,2,4,6",
    positions: Annotated[str, typer.Option()] = "last_prompt_and_response",
    questions: Annotated[int, typer.Option(help="How many evaluation questions.")] = 10,
    samples_per_question: Annotated[int, typer.Option()] = 1,
    max_new_tokens: Annotated[int, typer.Option()] = 48,
    temperature: Annotated[float, typer.Option()] = 1.0,
    coherence_threshold: Annotated[float, typer.Option()] = 50.0,
    random_control: Annotated[bool, typer.Option(help="Also steer along a random direction of the same norm.")] = True,
    seed: Annotated[int, typer.Option()] = 0,
    batch_size: Annotated[int, typer.Option()] = 32,
    overwrite: Annotated[bool, typer.Option()] = False,
    from_step: Annotated[
        str | None, typer.Option("--from", help="Redo this step and the ones after it: generate|scores|recommend.")
    ] = None,
) -> None:
    """Sweep layers × coefficients on evaluation questions; recommend a layer and coefficient.

    On a finished sweep, new layers or coefficients add only their replies, a new --coherence-threshold only
    recommends again, and new sampling settings redo the replies (old outputs go to stale/).
    """
    from personascope.pipelines.sweep import SweepConfig, format_table
    from personascope.pipelines.sweep import sweep as run_sweep

    cfg = SweepConfig(
        vector=str(vector),
        model=model,
        judge=judge,
        layers=_ints(layers, "--layers") if layers else None,
        coefs=_floats(coefs, "--coefs"),
        positions=positions,
        n_questions=questions,
        samples_per_question=samples_per_question,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        coherence_threshold=coherence_threshold,
        random_control=random_control,
        seed=seed,
        batch_size=batch_size,
    )
    target = out or vector.parent.parent / f"sweep-{vector.stem}"
    result = run_sweep(
        cfg, target, overwrite=overwrite, rerun_from=from_step, say=lambda line: typer.echo(line, err=True)
    )
    typer.echo(format_table(result.cells))
    if result.recommended:
        r = result.recommended
        typer.echo(
            f"recommended: layer {r['layer']}, coef {r['coef']:g} (trait {r['trait']:.1f}, "
            f"+{r['trait_change']:.1f} over unsteered; coherence {r['coherence']:.1f}) — written into {vector}"
        )
    else:
        typer.echo("no positive coefficient kept coherence above the threshold; nothing recommended")
    typer.echo(f"table and plot: {result.run_dir}")


def steer(
    vector: Annotated[Path, typer.Option("--vector", "-v", help="PersonaVector file.")],
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="Prompts (default: chat on stdin).")
    ] = None,
    model: ModelOpt = "smollm2-135m-instruct",
    layer: Annotated[int | None, typer.Option(help="Default: the vector's chosen layer.")] = None,
    coef: Annotated[float | None, typer.Option(help="Default: the vector's chosen coefficient.")] = None,
    positions: Annotated[str, typer.Option()] = "last_prompt_and_response",
    system: Annotated[str | None, typer.Option("--system", "-s")] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 96,
    temperature: Annotated[float, typer.Option()] = 0.7,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Chat with (or answer prompts from) a model steered by a persona vector."""
    import personascope as ps
    from personascope.residual.positions import check_positions
    from personascope.residual.steering import check_choices

    check_positions(positions)
    vec = ps.PersonaVector.load(vector)
    check_choices(vec, layer, coef, source=str(vector))
    m = ps.load_model(model)
    steer = ps.Steering.from_vector(m, vec, layer, coef, positions, source=str(vector))
    steering = steer.interventions()
    head = [{"role": "system", "content": system}] if system else []
    if prompt:
        gens = ps.generate(
            m,
            [[*head, {"role": "user", "content": p}] for p in prompt],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            interventions=steering,
        )
        for p, g in zip(prompt, gens, strict=True):
            typer.echo(f"> {p}\n{g.text}\n")
        return
    history = list(head)
    typer.echo(
        f"steering {vec.trait or 'vector'} at layer {steer.layer}, coef {steer.coef:g}; empty line quits", err=True
    )
    for turn, line in enumerate(sys.stdin):
        if not line.strip():
            break
        history.append({"role": "user", "content": line.strip()})
        g = ps.generate(
            m,
            [history],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed + turn,
            interventions=steering,
        )[0]
        history.append({"role": "assistant", "content": g.text})
        typer.echo(g.text)


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the runs go.")] = Path("demo_out"),
    trait: Annotated[str, typer.Option()] = "evil",
    model: ModelOpt = "smollm2-135m-instruct",
    overwrite: Annotated[bool, typer.Option(help="Start afresh instead of resuming.")] = False,
) -> None:
    """Pull the default model, extract a trait offline, sweep its steering, print the table."""
    from personascope.pipelines.demo import run_demo

    run_demo(out, trait=trait, model=model, overwrite=overwrite, say=typer.echo)
