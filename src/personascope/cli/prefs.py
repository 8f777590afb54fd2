"""`personascope prefs elicit | fit | probe | personas | steer`: task preferences under personas, probed and steered."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from personascope.cli.vectors import ModelOpt, _floats, _ints
from personascope.errors import PersonascopeError

prefs_app = typer.Typer(
    help="Task preferences: elicit pairwise choices, fit utilities, probe and steer them.", no_args_is_help=True
)

RunArg = Annotated[Path, typer.Argument(help="Preference run directory (made by `prefs elicit`).")]
DeviceOpt = Annotated[str | None, typer.Option(help="torch device (default: cuda if available, else cpu).")]
BatchOpt = Annotated[int, typer.Option(help="Prompts per forward pass.")]
PersonaOpt = Annotated[str | None, typer.Option(help="Persona of the run (default: its first).")]
AlphasOpt = Annotated[str | None, typer.Option(help="Comma-separated ridge penalties to choose from on val.")]


def _names(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for value in values or []:
        out += [v.strip() for v in value.split(",") if v.strip()]
    return out


def _alphas(text: str | None) -> tuple[float, ...]:
    from personascope.preferences.probes import DEFAULT_ALPHAS

    return tuple(_floats(text, "--alphas")) if text else DEFAULT_ALPHAS


@prefs_app.command("elicit")
def elicit(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (created, or resumed).")],
    model: ModelOpt = "smollm2-135m-instruct",
    persona: Annotated[
        list[str] | None, typer.Option("--persona", "-p", help="Persona name(s); repeat or comma-separate.")
    ] = None,
    personas_file: Annotated[Path | None, typer.Option(help="JSON persona file (default: the shipped set).")] = None,
    tasks: Annotated[Path | None, typer.Option(help="JSONL task pool (default: the shipped 448 tasks).")] = None,
    n_tasks: Annotated[int | None, typer.Option(help="Use this many tasks, spread over topics (default: all).")] = None,
    topic: Annotated[list[str] | None, typer.Option(help="Only these topics; repeat or comma-separate.")] = None,
    mode: Annotated[str, typer.Option(help="logprob (exact, stated) | revealed (sampled replies).")] = "logprob",
    budget: Annotated[int | None, typer.Option(help="Comparisons per persona (default ⌈2·N·log2 N⌉).")] = None,
    batch_pairs: Annotated[int | None, typer.Option(help="New pairs per active round (default N).")] = None,
    threshold: Annotated[float, typer.Option(help="Stop when successive fits' Spearman ρ reaches this.")] = 0.99,
    samples: Annotated[int, typer.Option(help="Replies per order (revealed mode).")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Reply length (revealed mode).")] = 16,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (revealed mode).")] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Start afresh instead of resuming.")] = False,
) -> None:
    """Elicit pairwise task choices (both orders, active pair selection) for one or more personas."""
    from personascope.preferences.steps import ElicitConfig, run_elicit

    cfg = ElicitConfig(
        model=model,
        personas=_names(persona) or ["assistant"],
        personas_file=str(personas_file) if personas_file else None,
        tasks_file=str(tasks) if tasks else None,
        n_tasks=n_tasks,
        topics=_names(topic) or None,
        mode=mode,
        budget=budget,
        batch_pairs=batch_pairs,
        threshold=threshold,
        samples=samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
    )
    res = run_elicit(cfg, out, overwrite=overwrite, device=device)
    for name, info in res.per_persona.items():
        bias = info.get("position_bias")
        typer.echo(
            f"{name}: {info['n_pairs']} pairs over {res.n_tasks} tasks in {info['rounds'] + 1} rounds "
            f"(budget {info['budget']}); mean label mass {_num(info.get('mean_label_mass'))}, "
            f"mean P(label A) {_num(bias)}"
        )
    typer.echo(f"run: {res.run_dir} ({res.seconds:.0f} s)")


def _num(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "—"


@prefs_app.command("fit")
def fit(
    run: RunArg,
    sigma_reg: Annotated[float, typer.Option(help="Penalty on log σ (see fit_thurstonian).")] = 1e-2,
    holdout: Annotated[float, typer.Option(help="Fraction of pairs held out for the metrics.")] = 0.05,
    pairs: Annotated[Path | None, typer.Option(help="JSONL of pair records to fit instead of the run's.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Fit Thurstonian utilities per persona; report held-out accuracy and log-loss against the ceiling."""
    from personascope.preferences.steps import run_fit

    res = run_fit(run, sigma_reg=sigma_reg, holdout=holdout, pairs_file=pairs, seed=seed)
    for name, m in res.metrics.items():
        typer.echo(
            f"{name}: {m['n_pairs']} pairs; held-out accuracy {_num(m.get('test_accuracy'))}, "
            f"log-loss {_num(m.get('test_log_loss'))} (ceiling {_num(m.get('ceiling_log_loss'))})"
        )
    typer.echo(f"utilities and fit.json in {res.run_dir}")


@prefs_app.command("probe")
def probe(
    run: RunArg,
    persona: PersonaOpt = None,
    alphas: AlphasOpt = None,
    embed: Annotated[bool, typer.Option(help="Score the all-MiniLM-L6-v2 text-embedding baseline.")] = True,
    loto: Annotated[bool, typer.Option(help="Also score leave-one-topic-out.")] = True,
    shuffles: Annotated[int, typer.Option(help="Label permutations for the shuffled-label control.")] = 10,
    seed: Annotated[int, typer.Option()] = 0,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = None,
) -> None:
    """Ridge probes on every layer's activations for the fitted utilities, against baselines."""
    from personascope.preferences.steps import run_probe

    res = run_probe(
        run,
        persona=persona,
        alphas=_alphas(alphas),
        embed=embed,
        loto=loto,
        n_shuffles=shuffles,
        seed=seed,
        batch_size=batch_size,
        device=device,
    )
    rep = res.report
    best = rep.best
    shuffled = next(s for s in rep.shuffled if s.layer == rep.best_layer)
    typer.echo(
        f"{res.persona}: best layer {rep.best_layer} (by val r): test r {best.test_r:.3f} "
        f"[{best.test_r_low:.3f}, {best.test_r_high:.3f}], pairwise acc {best.test_pair_acc:.3f}, "
        f"leave-topic-out r {best.loto_r:.3f} pooled / {best.loto_within_r:.3f} within topics; "
        f"shuffled labels r {shuffled.test_r:.3f} "
        f"(null 95% [{shuffled.test_r_low:.3f}, {shuffled.test_r_high:.3f}])"
    )
    for name, s in rep.baselines.items():
        typer.echo(
            f"  {name} baseline: test r {s.test_r:.3f}, pairwise acc {s.test_pair_acc:.3f}, "
            f"leave-topic-out r {s.loto_r:.3f} pooled / {s.loto_within_r:.3f} within topics"
        )
    typer.echo(f"table {res.files['md']}, plot {res.files['png']}")


@prefs_app.command("personas")
def personas(
    run: RunArg,
    alphas: AlphasOpt = None,
    layer: Annotated[int | None, typer.Option(help="Probe layer (default: each persona's best on val).")] = None,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = None,
) -> None:
    """Correlate personas' utilities and test probes across personas (needs a run with two or more)."""
    from personascope.preferences.steps import personas_table, run_personas

    res = run_personas(run, alphas=_alphas(alphas), layer=layer, batch_size=batch_size, device=device)
    typer.echo(personas_table(res))
    typer.echo(f"matrices in {res.run_dir / 'persona-matrix.png'}")


@prefs_app.command("steer")
def steer(
    run: RunArg,
    persona: PersonaOpt = None,
    layers: Annotated[
        str | None, typer.Option(help="Comma-separated layers (default: best probe layer, ⅓, ⅔).")
    ] = None,
    coefs: Annotated[str, typer.Option(help="Fractions of the layer's mean residual norm.")] = "-0.5,-0.25,0.25,0.5",
    pairs: Annotated[int, typer.Option(help="Task pairs to steer (held-out tasks with close utilities).")] = 12,
    single: Annotated[bool, typer.Option(help="Also steer one task only.")] = True,
    random_control: Annotated[bool, typer.Option("--random/--no-random", help="Random-direction control.")] = True,
    seed: Annotated[int, typer.Option()] = 0,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = None,
) -> None:
    """Differential steering of pairwise choices with the probe direction, against a random direction."""
    from personascope.preferences.steps import run_steer, steer_table

    layer_list = _ints(layers, "--layers") if layers else None
    coef_list = _floats(coefs, "--coefs")
    if not coef_list:
        raise PersonascopeError("--coefs needs at least one number")
    res = run_steer(
        run,
        persona=persona,
        layers=layer_list,
        coefs=coef_list,
        n_pairs=pairs,
        single=single,
        random_control=random_control,
        seed=seed,
        batch_size=batch_size,
        device=device,
    )
    typer.echo(steer_table(res))
    typer.echo(f"curves in {res.run_dir / 'steer.png'}")
