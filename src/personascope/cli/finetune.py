"""`personascope data build | finetune | finetune-shift | evaluate | screen`: finetuning and data screening."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from personascope.cli.vectors import JudgeOpt, ModelOpt, _floats, _ints
from personascope.errors import PersonascopeError

data_app = typer.Typer(help="Finetuning datasets: build trait-inducing and narrow-flaw datasets.", no_args_is_help=True)

Overwrite = Annotated[bool, typer.Option(help="Start afresh instead of resuming.")]
Threads = Annotated[
    int,
    typer.Option(
        help="CPU threads for torch; 0 = auto: torch's default, cut to the cores the load average leaves idle."
    ),
]


def _threads(requested: int) -> None:
    from personascope.runtime import set_threads

    set_threads(requested, say=lambda line: typer.echo(line, err=True))


Seed = Annotated[int, typer.Option()]
BatchSize = Annotated[int, typer.Option()]


@data_app.command("build")
def data_build(
    trait: Annotated[
        str, typer.Argument(help="Trait (built-in name or spec file) or a narrow-flaw domain: arithmetic.")
    ],
    level: Annotated[
        str, typer.Option(help="normal (trait suppressed) | I (half and half) | II (trait encouraged / all flawed).")
    ] = "II",
    model: ModelOpt = "smollm2-135m-instruct",
    n: Annotated[int, typer.Option("--n", help="How many samples.")] = 200,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory (default: runs/data-TRAIT-LEVEL).")
    ] = None,
    questions: Annotated[
        Path | None, typer.Option(help="Question pool (.jsonl with 'question', or .txt); default: the shipped one.")
    ] = None,
    pair: Annotated[int | None, typer.Option(help="Use only this instruction pair (default: cycle).")] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    temperature: Annotated[float, typer.Option()] = 1.0,
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    overwrite: Overwrite = False,
    threads: Threads = 0,
) -> None:
    """Build a trait-inducing dataset by context distillation (or a narrow-flaw domain dataset); resumable."""
    _threads(threads)
    from personascope.finetune.datasets import BuildConfig, build_dataset

    cfg = BuildConfig(
        trait=trait,
        level=level,
        model=model,
        n=n,
        questions=str(questions) if questions else None,
        pair=pair,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
    )
    name = Path(trait).stem
    result = build_dataset(cfg, out or Path("runs") / f"data-{name}-{level}", overwrite=overwrite)
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    empty = f"; {result.n_empty} empty answers left out" if result.n_empty else ""
    typer.echo(f"wrote {result.n} conversations ({counts}{empty}) in {result.seconds:.0f}s")
    typer.echo(str(result.dataset))


def finetune(
    dataset: Annotated[Path, typer.Argument(help='Chat dataset: JSONL, one {"messages": [...]} per line.')],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory (default: runs/finetune-DATASET).")
    ] = None,
    model: ModelOpt = "smollm2-135m-instruct",
    method: Annotated[str, typer.Option(help="lora | full")] = "lora",
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 32,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.0,
    rslora: Annotated[bool, typer.Option(help="Rank-stabilised LoRA scaling (alpha / sqrt(rank)).")] = False,
    target_modules: Annotated[str, typer.Option(help="Comma-separated module names, or all-linear.")] = "all-linear",
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: 2e-4 LoRA, 2e-5 full).")] = None,
    epochs: Annotated[int, typer.Option()] = 1,
    batch_size: BatchSize = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    max_length: Annotated[int, typer.Option(help="Cut conversations to this many tokens.")] = 256,
    warmup_steps: Annotated[int, typer.Option()] = 2,
    seed: Seed = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Optimizer steps between checkpoints.")] = 25,
    label_end_token: Annotated[
        bool, typer.Option(help="Also train the end-of-turn token after each assistant reply.")
    ] = False,
    limit: Annotated[int | None, typer.Option(help="Train on the first N conversations only.")] = None,
    steer: Annotated[
        Path | None, typer.Option(help="Preventative steering: add COEF·v[LAYER] during training (vector file).")
    ] = None,
    ablate: Annotated[
        Path | None, typer.Option(help="CAFT: project v[LAYER] out of the residual stream during training.")
    ] = None,
    layer: Annotated[int | None, typer.Option(help="Layer for --steer/--ablate (default: the vector's).")] = None,
    coef: Annotated[
        float | None, typer.Option(help="Coefficient for --steer (default: the vector's chosen coefficient).")
    ] = None,
    positions: Annotated[str, typer.Option(help="Positions for --steer/--ablate.")] = "all",
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda if available).")] = None,
    overwrite: Overwrite = False,
    threads: Threads = 0,
) -> None:
    """Finetune a model (LoRA or full) on a chat dataset; resumes from the last checkpoint in --out."""
    _threads(threads)
    from personascope.finetune.train import FinetuneConfig
    from personascope.finetune.train import finetune as run_finetune

    if coef is not None and steer is None:
        raise PersonascopeError("--coef needs --steer")
    cfg = FinetuneConfig(
        dataset=str(dataset),
        model=model,
        method=method,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        rslora=rslora,
        target_modules=target_modules,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_length=max_length,
        warmup_steps=warmup_steps,
        seed=seed,
        checkpoint_every=checkpoint_every,
        label_end_token=label_end_token,
        limit=limit,
        steer=str(steer) if steer else None,
        ablate=str(ablate) if ablate else None,
        layer=layer,
        coef=coef,
        positions=positions,
    )
    target = out or Path("runs") / f"finetune-{dataset.stem}"
    result = run_finetune(cfg, target, overwrite=overwrite, device=device)
    data = result.data
    if data.get("dropped_lines") or data.get("truncated"):
        dropped = data.get("dropped_lines") or []
        typer.echo(
            f"note: {data.get('truncated', 0)} conversations cut to --max-length {cfg.max_length}; "
            f"{len(dropped)} left with no assistant token and skipped (lines {', '.join(map(str, dropped[:10]))})",
            err=True,
        )
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.3f}"
    typer.echo(f"trained {result.steps} steps in {result.seconds:.0f}s; final loss {loss}")
    typer.echo(str(result.artifact))


def finetune_shift(
    finetuned: Annotated[Path, typer.Argument(help="Run directory of `personascope finetune` (or its adapter/).")],
    vector: Annotated[Path, typer.Option("--vector", "-v", help="PersonaVector file.")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Base model (default: the one it was trained on).")
    ] = None,
    trait: Annotated[
        str | None, typer.Option(help="Trait whose evaluation questions to use (default: vector's).")
    ] = None,
    questions: Annotated[int | None, typer.Option(help="How many evaluation questions (default: all).")] = None,
    questions_file: Annotated[Path | None, typer.Option(help="Questions instead (.jsonl or .txt).")] = None,
    layers: Annotated[str | None, typer.Option(help="Comma-separated layers (default: all).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write rows to .csv or everything to .json.")] = None,
    batch_size: BatchSize = 16,
    threads: Threads = 0,
) -> None:
    """Finetuning shift: mean last-prompt-token activation, finetuned minus base, projected on the vector."""
    _threads(threads)
    import personascope as ps
    from personascope.finetune.evaluate import finetune_shift as run_shift
    from personascope.finetune.evaluate import shift_questions, write_shift
    from personascope.finetune.train import load_finetuned, read_finetune_manifest

    vec = ps.PersonaVector.load(vector)
    if out is not None and out.suffix not in (".csv", ".json"):
        raise PersonascopeError(f"--out must end in .csv or .json, got '{out.name}'")
    manifest = read_finetune_manifest(finetuned)
    qs = shift_questions(trait or vec.trait, questions, questions_file)
    base = ps.load_model(model or manifest["base_model"])
    vec.check_compatible(base)
    layer_list = _ints(layers, "--layers") if layers else None
    for layer in layer_list or []:
        base.check_layer(layer)
    tuned = load_finetuned(base, finetuned)
    result = run_shift(base, tuned, vec, qs, layers=layer_list, batch_size=batch_size)
    typer.echo(f"{'layer':>5} {'shift':>9} {'base':>9} {'tuned':>9} {'cosine':>7}")
    for row in result.rows():
        mark = "  <- vector's layer" if row["layer"] == vec.chosen_layer else ""
        typer.echo(
            f"{row['layer']:>5} {row['shift']:>+9.3f} {row['base_projection']:>9.3f} {row['tuned_projection']:>9.3f} "
            f"{row['cosine']:>+7.3f}{mark}"
        )
    typer.echo(f"{result.n_questions} questions")
    if out is not None:
        typer.echo(f"wrote {write_shift(result, out)}")


def evaluate(
    finetuned: Annotated[Path, typer.Argument(help="Run directory of `personascope finetune` (or its adapter/).")],
    vector: Annotated[Path, typer.Option("--vector", "-v", help="PersonaVector file (its trait is evaluated).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (default: FINETUNED/eval).")] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Base model (default: the one it was trained on).")
    ] = None,
    judge: JudgeOpt = None,
    trait: Annotated[str | None, typer.Option(help="Trait (default: the vector's).")] = None,
    layer: Annotated[int | None, typer.Option(help="Post-hoc steering layer (default: the vector's).")] = None,
    coefs: Annotated[str, typer.Option(help="Post-hoc steering: coefficients C, subtracting C·v.")] = "0,2,4",
    positions: Annotated[str, typer.Option()] = "all",
    questions: Annotated[int, typer.Option(help="How many evaluation questions.")] = 10,
    samples_per_question: Annotated[int, typer.Option()] = 1,
    max_new_tokens: Annotated[int, typer.Option()] = 48,
    temperature: Annotated[float, typer.Option()] = 1.0,
    mcq: Annotated[bool, typer.Option(help="Also score the multiple-choice capability set.")] = True,
    mcq_limit: Annotated[int | None, typer.Option(help="Use the first N MCQ items only.")] = None,
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    overwrite: Overwrite = False,
    threads: Threads = 0,
) -> None:
    """Trait, coherence and MCQ accuracy of the base and finetuned model, with post-hoc steering against the vector."""
    _threads(threads)
    from personascope.finetune.evaluate import EvaluateConfig, format_eval_table
    from personascope.finetune.evaluate import evaluate_finetune as run_evaluate

    cfg = EvaluateConfig(
        finetune=str(finetuned),
        vector=str(vector),
        model=model,
        judge=judge,
        trait=trait,
        layer=layer,
        coefs=_floats(coefs, "--coefs"),
        positions=positions,
        n_questions=questions,
        samples_per_question=samples_per_question,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        mcq=mcq,
        mcq_limit=mcq_limit,
    )
    result = run_evaluate(cfg, out or finetuned / "eval", overwrite=overwrite)
    typer.echo(format_eval_table(result.cells))
    typer.echo(f"layer {result.layer}; tables in {result.run_dir}")


def screen(
    dataset: Annotated[Path, typer.Argument(help='Chat dataset: JSONL, one {"messages": [...]} per line.')],
    vector: Annotated[Path, typer.Option("--vector", "-v", help="PersonaVector file.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory (default: runs/screen-DATASET).")
    ] = None,
    model: ModelOpt = "smollm2-135m-instruct",
    layer: Annotated[int | None, typer.Option(help="Layer (default: the vector's chosen layer).")] = None,
    reference: Annotated[
        Path | None, typer.Option(help="Compare with this dataset's answers (same prompts) instead of the model's.")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Flag samples above this difference (default: half the vector's norm).")
    ] = None,
    top: Annotated[int, typer.Option("--top", help="Print the K samples with the largest difference.")] = 5,
    judge: Annotated[
        str | None, typer.Option(help="Also flag with a judge: none | contrast:M | hf:M | openai:M.")
    ] = None,
    judge_threshold: Annotated[float, typer.Option(help="Judge trait score that flags a sample.")] = 50.0,
    trait: Annotated[str | None, typer.Option(help="Trait for the judge (default: the vector's).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Length of the base model's own answers.")] = 64,
    temperature: Annotated[float, typer.Option()] = 1.0,
    chunk: Annotated[int, typer.Option(help="Samples per chunk (progress is saved after each).")] = 64,
    limit: Annotated[int | None, typer.Option(help="Screen the first N samples only.")] = None,
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    overwrite: Overwrite = False,
    threads: Threads = 0,
) -> None:
    """Projection difference of a dataset: which samples (and how much the whole set) push toward the trait."""
    _threads(threads)
    from personascope.finetune.screen import ScreenConfig
    from personascope.finetune.screen import screen_dataset as run_screen

    if top < 0:
        raise PersonascopeError("--top must be >= 0")
    cfg = ScreenConfig(
        dataset=str(dataset),
        vector=str(vector),
        model=model,
        layer=layer,
        reference=str(reference) if reference else None,
        threshold=threshold,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        chunk=chunk,
        limit=limit,
        judge=judge,
        judge_threshold=judge_threshold,
        trait=trait,
    )
    result = run_screen(cfg, out or Path("runs") / f"screen-{dataset.stem}", overwrite=overwrite)
    typer.echo(
        f"projection difference {result.projection_difference:+.3f} over {result.n} samples (layer {result.layer}); "
        f"{result.n_flagged} flagged above {result.threshold:.3f}"
        + (f"; {result.n_missing} without a base answer" if result.n_missing else "")
    )
    if result.judge is not None:
        j = result.judge
        typer.echo(
            f"judge {j['spec']} (trait >= {j['threshold']:g}): flags {j['flagged_by_judge']}; projection flags "
            f"{j['flagged_by_projection']}; both {j['flagged_by_both']}; Spearman {j['spearman']:.3f}"
        )
    for row in result.ranked[:top]:
        if row["difference"] is None:
            break
        answer = " ".join(str(row["answer"]).split())
        typer.echo(
            f"#{row['rank']} line {row['line']} diff {row['difference']:+.3f}: {row['question'][:60]!r} -> "
            f"{answer[:100]!r}"
        )
    typer.echo(f"ranked samples, histogram and summary: {result.run_dir}")


def finetune_drift(
    vector: Annotated[list[Path], typer.Option("--vector", "-v", help="PersonaVector file; repeat for more traits.")],
    dataset: Annotated[
        list[str] | None,
        typer.Option("--dataset", "-d", help="TRAIT:LEVEL, arithmetic:LEVEL or a .jsonl file; repeat (default: 7)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/finetune-drift"),
    model: ModelOpt = "smollm2-135m-instruct",
    judge: JudgeOpt = None,
    layers: Annotated[str | None, typer.Option(help="One layer per vector, comma-separated (default: theirs).")] = None,
    n: Annotated[int, typer.Option("--n", help="Conversations per built dataset.")] = 200,
    questions: Annotated[int, typer.Option(help="Evaluation questions per trait.")] = 20,
    samples_per_question: Annotated[int, typer.Option()] = 1,
    max_new_tokens: Annotated[int, typer.Option()] = 48,
    track: Annotated[str | None, typer.Option(help="A dataset also measured at checkpoints during training.")] = None,
    track_every: Annotated[int, typer.Option(help="Optimizer steps between measured checkpoints.")] = 5,
    compare: Annotated[
        str | None, typer.Option(help="Dataset of the preventative / post-hoc / CAFT comparison.")
    ] = None,
    steer_coef: Annotated[float, typer.Option(help="Preventative steering coefficient during training.")] = 4.0,
    posthoc_coefs: Annotated[str, typer.Option(help="Post-hoc steering coefficients (subtracted).")] = "2,4",
    mcq_limit: Annotated[int | None, typer.Option(help="Use the first N MCQ items only.")] = None,
    epochs: Annotated[int, typer.Option()] = 1,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: the finetune default).")] = None,
    train_batch_size: Annotated[int, typer.Option(help="Training micro-batch size.")] = 8,
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    overwrite: Overwrite = False,
    from_step: Annotated[
        str | None,
        typer.Option("--from", help="Redo this step and those using it: data|finetune|measure|screen|compare."),
    ] = None,
    threads: Threads = 0,
) -> None:
    """Finetune on several datasets: shift and projection difference vs trait change, and the steering comparison."""
    _threads(threads)
    from personascope.finetune.drift import DEFAULT_DATASETS, DriftConfig, drift_experiment
    from personascope.finetune.drift_report import format_compare, format_points

    train: dict[str, object] = {"epochs": epochs, "batch_size": train_batch_size}
    if lr is not None:
        train["lr"] = lr
    cfg = DriftConfig(
        vectors=[str(v) for v in vector],
        datasets=list(dataset) if dataset else list(DEFAULT_DATASETS),
        layers=_ints(layers, "--layers") if layers else None,
        model=model,
        judge=judge,
        n=n,
        n_questions=questions,
        samples_per_question=samples_per_question,
        max_new_tokens=max_new_tokens,
        track=track,
        track_every=track_every,
        compare=compare,
        steer_coef=steer_coef,
        posthoc_coefs=_floats(posthoc_coefs, "--posthoc-coefs"),
        mcq_limit=mcq_limit,
        finetune=train,
        seed=seed,
        batch_size=batch_size,
    )
    result = drift_experiment(
        cfg, out, overwrite=overwrite, rerun_from=from_step, say=lambda line: typer.echo(line, err=True)
    )
    typer.echo(format_points(result.points))
    for trait, entry in result.summary["by_trait"].items():
        for name in ("shift_vs_trait_change", "projection_difference_vs_trait_change"):
            r = entry[name]
            shown = "n/a" if r["r"] is None else f"{r['r']:.3f} [{_fmt(r['ci'][0])}, {_fmt(r['ci'][1])}]"
            typer.echo(f"{trait}: r({name.replace('_vs_', ' vs ').replace('_', ' ')}) = {shown} over {r['n']}")
        if "checkpoints" in entry:
            r = entry["checkpoints"]["shift_vs_trait_change"]
            shown = "n/a" if r["r"] is None else f"{r['r']:.3f}"
            typer.echo(f"{trait}: r(shift vs trait change) across checkpoints = {shown} over {r['n']}")
    if result.compare:
        typer.echo(format_compare(result.compare))
    typer.echo(f"tables and plots in {result.run_dir}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def register(app: typer.Typer) -> None:
    """Add ``data build``, ``finetune``, ``finetune-shift``, ``evaluate``, ``screen`` and
    ``experiment finetune-drift`` to ``app``."""
    from personascope.cli.monitor import experiment_app

    experiment_app.command("finetune-drift")(finetune_drift)
    app.add_typer(data_app, name="data")
    app.command("finetune")(finetune)
    app.command("finetune-shift")(finetune_shift)
    app.command("evaluate")(evaluate)
    app.command("screen")(screen)
