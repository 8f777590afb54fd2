"""`personascope monitor` and `personascope experiment monitor-prompts | monitor-manyshot`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from personascope.cli.vectors import JudgeOpt, ModelOpt, _ints

experiment_app = typer.Typer(help="Experiments that reproduce the papers' claims.", no_args_is_help=True)


def monitor(
    vector: Annotated[Path, typer.Option("--vector", "-v", help="PersonaVector file.")],
    input: Annotated[Path, typer.Option("--input", "-i", help="JSONL: one conversation per line.")],
    model: ModelOpt = "smollm2-135m-instruct",
    layer: Annotated[list[int] | None, typer.Option(help="Layer(s) (default: the vector's chosen layer).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Rows as .csv or .jsonl.")] = Path("monitor.csv"),
    plot: Annotated[Path | None, typer.Option(help="Also plot projection per turn to this .png.")] = None,
) -> None:
    """Projection of every turn (before each reply, and each reply) on a persona vector."""
    from personascope.pipelines.monitor import monitor_file

    rows = monitor_file(vector, input, out, model=model, layers=layer or None, plot=plot)
    for r in rows:
        typer.echo(f"conv {r.conversation} turn {r.turn + 1} {r.kind:<11} layer {r.layer}: {r.projection:+.3f}")
    typer.echo(f"wrote {out}" + (f" and {plot}" if plot else ""))


def _experiment(
    kind: str,
    vector: Path,
    out: Path | None,
    model: str,
    judge: str | None,
    questions: int,
    samples: int,
    max_new_tokens: int,
    shots: str,
    seed: int,
    overwrite: bool,
) -> None:
    from personascope.pipelines.monitor_experiments import MonitorExperimentConfig, run_monitor_experiment

    cfg = MonitorExperimentConfig(
        kind=kind,
        vector=str(vector),
        model=model,
        judge=judge,
        n_questions=questions,
        samples_per_question=samples,
        max_new_tokens=max_new_tokens,
        shots=_ints(shots, "--shots"),
        seed=seed,
    )
    target = out or vector.parent.parent / f"monitor-{kind}-{vector.stem}"
    res = run_monitor_experiment(cfg, target, overwrite=overwrite)
    typer.echo(
        f"best layer {res.best_layer}: r = {res.r:.3f} [{res.r_ci[0]:.3f}, {res.r_ci[1]:.3f}] over "
        f"{res.n_points} prompts; mean within-group r = {res.mean_within:.3f}"
    )
    for group, r in res.within.items():
        typer.echo(f"  within {group:<18} r = {r:.3f}")
    typer.echo(f"scatter and tables: {res.run_dir}")


Vec = Annotated[Path, typer.Option("--vector", "-v", help="PersonaVector file (its trait is used).")]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Run directory.")]
Questions = Annotated[int, typer.Option(help="Evaluation questions per rung / shot count.")]
Samples = Annotated[int, typer.Option(help="Answers sampled per prompt.")]
Tokens = Annotated[int, typer.Option()]
Shots = Annotated[str, typer.Option(help="Shot counts (many-shot only).")]
Seed = Annotated[int, typer.Option()]
Overwrite = Annotated[bool, typer.Option()]


@experiment_app.command("monitor-prompts")
def monitor_prompts(
    vector: Vec,
    out: Out = None,
    model: ModelOpt = "smollm2-135m-instruct",
    judge: JudgeOpt = None,
    questions: Questions = 10,
    samples: Samples = 2,
    max_new_tokens: Tokens = 48,
    seed: Seed = 0,
    overwrite: Overwrite = False,
) -> None:
    """System-prompt interpolation: 8 rungs from suppressing to encouraging the trait."""
    _experiment("prompts", vector, out, model, judge, questions, samples, max_new_tokens, "0", seed, overwrite)


@experiment_app.command("monitor-manyshot")
def monitor_manyshot(
    vector: Vec,
    out: Out = None,
    model: ModelOpt = "smollm2-135m-instruct",
    judge: JudgeOpt = None,
    questions: Questions = 10,
    samples: Samples = 2,
    max_new_tokens: Tokens = 48,
    shots: Shots = "0,2,4,8,16",
    seed: Seed = 0,
    overwrite: Overwrite = False,
) -> None:
    """Many-shot: trait-showing (and trait-free control) examples in context before the question."""
    _experiment("manyshot", vector, out, model, judge, questions, samples, max_new_tokens, shots, seed, overwrite)
