"""Finetuning: LoRA (through peft) or a full finetune, with optional preventative steering or CAFT ablation.

A plain torch loop: AdamW, linear warm-up then linear decay, gradient accumulation, gradient clipping, loss on
assistant tokens only (see :mod:`personascope.finetune.datasets`), normalised by the number of labelled tokens in
each optimizer step. The data order of epoch ``e`` is a permutation seeded with ``seed + e`` and every optimizer step
reseeds torch's generator, so a run resumed from a checkpoint ends exactly where an uninterrupted one would.

Steering during training goes through the engine: every training forward pass runs inside
``personascope.intervene(model, [Add(coef · v[L], L)])`` (preventative steering, the paper's "steer *along* the
vector while training") or ``[Ablate(v[L], L)]`` (CAFT: project the direction out). The hooks exist only inside that
``with`` block, so the trained model — and the saved adapter — runs unsteered at inference.

Run directory layout::

    manifest.json            config (dataset and vector digests, base fingerprint), step status
    loss.jsonl               one record per optimizer step: loss, learning rate, labelled tokens, training seconds
                             so far (summed over resumed calls; the manifest's train_seconds is the total)
    checkpoints/step-NNNNNN  the latest checkpoint: trainable weights and optimizer state (safetensors + JSON)
    adapter/                 LoRA: peft's adapter (safetensors) + personascope.json (base fingerprint, config)
    model/                   full finetune: the whole model and tokenizer (safetensors) + personascope.json

No pickle anywhere: checkpoints store tensors as safetensors and everything else as JSON.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from personascope.errors import PersonascopeError
from personascope.finetune.checkpoints import checkpoints, restore_checkpoint, save_checkpoint
from personascope.finetune.datasets import (
    IGNORE,
    TokenizedExample,
    dataset_digest,
    load_chat_jsonl,
    tokenize_examples,
)
from personascope.residual.forward import attention_mask, forward, pad
from personascope.residual.interventions import Ablate, Intervention, intervene
from personascope.residual.positions import PROMPT, PROMPT_LAST, RESPONSE, check_positions
from personascope.residual.steering import Steering

if TYPE_CHECKING:
    from personascope.models.loading import Model
    from personascope.runs import RunDir

__all__ = [
    "FINETUNE_MANIFEST",
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
    "forward_loss",
    "load_finetuned",
    "read_finetune_manifest",
    "training_interventions",
]

FINETUNE_MANIFEST = "personascope.json"
_FORMAT = "personascope-finetune"
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}


@dataclass
class FinetuneConfig:
    """Everything that defines a finetuning run (a run directory resumes only with the same config).

    ``steer``/``ablate`` name a PersonaVector file; ``layer`` defaults to the vector's chosen layer and, with
    ``steer``, ``coef`` to its chosen coefficient (:meth:`~personascope.residual.Steering.from_vector`; a missing one
    is an error, never a silent 0). With ``steer``, ``coef · v[layer]`` is added at ``positions`` during every
    training forward pass; with ``ablate``, the component along ``v[layer]`` is removed there.
    """

    dataset: str
    model: str = "smollm2-135m-instruct"
    method: str = "lora"  # lora | full
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    rslora: bool = False
    target_modules: list[str] | str = "all-linear"
    lr: float | None = None  # default: 2e-4 (lora) or 2e-5 (full)
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    warmup_steps: int = 2
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 25
    label_end_token: bool = False
    limit: int | None = None  # train on the first N conversations only
    steer: str | None = None
    ablate: str | None = None
    layer: int | None = None
    coef: float | None = None
    positions: str = "all"

    def resolved(self) -> FinetuneConfig:
        out = FinetuneConfig(**asdict(self))
        if out.method not in DEFAULT_LR:
            raise PersonascopeError(f"unknown method '{out.method}'; use lora or full")
        if out.lr is None:
            out.lr = DEFAULT_LR[out.method]
        for name in ("rank", "epochs", "batch_size", "grad_accum", "max_length", "checkpoint_every"):
            if int(getattr(out, name)) < 1:
                raise PersonascopeError(f"{name.replace('_', '-')} must be at least 1")
        if out.lr <= 0:
            raise PersonascopeError("lr must be positive")
        if out.warmup_steps < 0 or out.weight_decay < 0 or out.max_grad_norm < 0 or not 0 <= out.dropout < 1:
            raise PersonascopeError("warmup steps, weight decay and max grad norm must be >= 0, dropout in [0, 1)")
        if out.steer and out.ablate:
            raise PersonascopeError("choose --steer or --ablate, not both")
        if out.layer is not None and not (out.steer or out.ablate):
            raise PersonascopeError("--layer needs --steer or --ablate")
        if out.coef is not None and not out.steer:
            raise PersonascopeError("--coef needs --steer")
        if isinstance(out.target_modules, str) and out.target_modules != "all-linear":
            out.target_modules = [m.strip() for m in out.target_modules.split(",") if m.strip()]
        if not out.target_modules:
            raise PersonascopeError("give at least one LoRA target module (or all-linear)")
        check_positions(out.positions)
        return out


@dataclass
class FinetuneResult:
    run_dir: Path
    artifact: Path  # the adapter (LoRA) or model (full) directory
    model: Model  # the finetuned model, unsteered, in eval mode
    steps: int
    final_loss: float | None
    losses: list[float]
    data: dict[str, Any]  # tokenisation stats: n, kept, truncated, dropped_lines
    seconds: float
    resumed_from: int = 0
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ the forward pass


def training_interventions(
    model: Model,
    *,
    steer: torch.Tensor | None = None,
    ablate: torch.Tensor | None = None,
    layer: int | None = None,
    coef: float | None = None,
    positions: str = "all",
) -> list[Intervention]:
    """The engine interventions a training forward pass runs under: ``Add(coef · steer)`` or ``Ablate(ablate)``."""
    if steer is None and ablate is None:
        return []
    if layer is None:
        raise PersonascopeError("steering or ablating during training needs a layer")
    if steer is not None:
        if coef is None:
            raise PersonascopeError("steering during training needs a coefficient (--coef)")
        return Steering.from_vector(model, steer.detach().float(), layer, coef, positions).interventions()
    model.check_layer(layer)
    pos = check_positions(positions)
    assert ablate is not None
    return [Ablate(ablate.detach().float(), layer, pos)]


def collate(
    batch: Sequence[TokenizedExample], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, labels (``-100`` on padding) and token roles for one micro-batch.

    Labelled tokens get the role ``response``, the token before each labelled run ``last prompt``, every other real
    token ``prompt`` and padding ``pad``, so ``positions`` names mean the same as during generation.
    """
    row_roles = []
    for ex in batch:
        labelled = torch.tensor(ex.labels) != IGNORE
        r = torch.where(labelled, RESPONSE, PROMPT)
        r[:-1][labelled[1:] & ~labelled[:-1]] = PROMPT_LAST  # the token before each labelled run
        row_roles.append(r.tolist())
    ids, roles = pad([ex.input_ids for ex in batch], row_roles, pad_id)
    labels, _ = pad([ex.labels for ex in batch], row_roles, IGNORE)
    return ids.to(device), attention_mask(roles).to(device), labels.to(device), roles.to(device)


def forward_loss(
    model: Model, batch: Sequence[TokenizedExample], interventions: Sequence[Intervention] = ()
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled tokens of ``batch`` and their count.

    The forward pass runs inside ``intervene(model, interventions)`` (with the batch's token roles known to the
    engine), so steering and ablation act exactly as they do at inference — and only here.
    """
    ids, mask, labels, roles = collate(batch, int(model.tokenizer.pad_token_id), model.device)
    target = labels[:, 1:]
    n_tokens = int((target != IGNORE).sum())
    labelled_cols = (target != IGNORE).any(dim=0).nonzero()
    first = int(labelled_cols[0]) if len(labelled_cols) else 0  # first prediction position that carries a label
    width = ids.shape[1]
    ctx = intervene(model, interventions) if interventions else contextlib.nullcontext()
    with ctx:
        out, offset = forward(model, ids, roles, mask=mask, keep_last=width - first if first > 0 else None)
    logits = out.logits  # logits[:, j] predicts token offset + j + 1
    logits = logits[:, : width - 1 - offset]
    target = target[:, offset:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, n_tokens


# ------------------------------------------------------------------------------------------------ manifests, loading


def _artifact_dir(path: str | Path) -> Path:
    """The adapter/model folder for a run directory or the folder itself."""
    root = Path(path)
    if (root / FINETUNE_MANIFEST).is_file():
        return root
    for name in ("adapter", "model"):
        if (root / name / FINETUNE_MANIFEST).is_file():
            return root / name
    if not root.exists():
        raise PersonascopeError(f"finetune not found: {root}")
    raise PersonascopeError(
        f"{root} is not a personascope finetune (no {FINETUNE_MANIFEST}); give the run directory of "
        "`personascope finetune` or its adapter/ folder"
    )


def read_finetune_manifest(path: str | Path) -> dict[str, Any]:
    """The ``personascope.json`` of a finetune (run directory, adapter/ or model/ folder)."""
    folder = _artifact_dir(path)
    try:
        data = json.loads((folder / FINETUNE_MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PersonascopeError(f"{folder / FINETUNE_MANIFEST} is unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise PersonascopeError(f"{folder / FINETUNE_MANIFEST} is not a personascope finetune manifest")
    data["path"] = str(folder)
    return data


def load_finetuned(
    base: str | Model | None,
    adapter_dir: str | Path,
    *,
    merge: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Model:
    """The finetuned model: ``base`` (a spec, a loaded Model — never modified, its weights are copied — or None for
    the base recorded in the manifest) with the adapter applied (merged into the weights unless ``merge=False``).

    The base model's fingerprint must match the one recorded when the adapter was trained; a mismatch is a
    one-line error. A full finetune loads its own saved model (checked against ``base`` when one is given).
    """
    from personascope.models.loading import Model as ModelCls
    from personascope.models.loading import load_model

    manifest = read_finetune_manifest(adapter_dir)
    folder = Path(manifest["path"])
    kind = manifest.get("kind")
    if kind == "full" and base is None:
        tuned = load_model(str(folder), device=device, dtype=dtype)
        tuned.name = f"{manifest.get('base_model_name', 'model')}+{_label(folder)}"
        return tuned
    base_model = (
        base if isinstance(base, ModelCls) else load_model(base or manifest["base_model"], device=device, dtype=dtype)
    )
    if base_model.fingerprint() != manifest.get("base_fingerprint"):
        raise PersonascopeError(
            f"{folder} was trained on {manifest.get('base_model_name')} (fingerprint "
            f"{manifest.get('base_fingerprint')}) but {base_model.name} has fingerprint {base_model.fingerprint()}; "
            f"pass the base model it was trained on (--model {manifest.get('base_model')})"
        )
    if kind == "full":
        tuned = load_model(str(folder), device=base_model.device, dtype=base_model.dtype)
        tuned.name = f"{base_model.name}+{_label(folder)}"
        return tuned
    if kind != "lora":
        raise PersonascopeError(f"{folder}: unknown finetune kind {kind!r}")
    from peft import PeftModel

    hf = copy.deepcopy(base_model.hf_model) if isinstance(base, ModelCls) else base_model.hf_model
    try:
        with warnings.catch_warnings():  # transformers' deprecation notice raised from inside peft
            warnings.simplefilter("ignore", FutureWarning)
            wrapped: Any = PeftModel.from_pretrained(hf, str(folder))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PersonascopeError(f"cannot apply the adapter in {folder} ({first})") from None
    hf_out = wrapped.merge_and_unload() if merge else wrapped
    hf_out.eval()
    return ModelCls(
        hf_model=hf_out,
        tokenizer=base_model.tokenizer,
        name=f"{base_model.name}+{_label(folder)}",
        layers_path=base_model.layers_path,
    )


def _label(folder: Path) -> str:
    return folder.parent.name if folder.name in ("adapter", "model") else folder.name


# ------------------------------------------------------------------------------------------------ training


def _training_vector(cfg: FinetuneConfig, model: Model) -> tuple[torch.Tensor, int, float | None, str]:
    """The direction, layer and (for ``steer``) coefficient a run trains with, by the one steering policy."""
    from personascope.residual.steering import chosen_layers
    from personascope.vectors import PersonaVector

    path = str(cfg.steer or cfg.ablate)
    vector = PersonaVector.load(path)
    if cfg.steer:
        steering = Steering.from_vector(model, vector, cfg.layer, cfg.coef, cfg.positions, source=path)
        return steering.directions[0].clone(), steering.layer, float(steering.coef), dataset_digest(path)
    vector.check_compatible(model)
    layer = chosen_layers(model, vector, cfg.layer, source=path)[0]
    direction = vector.directions[layer]
    if not bool(torch.isfinite(direction).all()) or float(direction.norm()) == 0:
        raise PersonascopeError(f"{path} is zero or non-finite at layer {layer}; CAFT needs a real direction")
    return direction.clone(), layer, None, dataset_digest(path)


def _finished(run: RunDir, base: Model, artifact: Path, started: float) -> FinetuneResult:
    """The result of a run that finished training in an earlier call: its saved model, loaded again."""
    tuned = load_finetuned(base, artifact, merge=False)
    info = run.manifest["steps"]["train"]
    losses = [float(r["loss"]) for r in run.records("loss")]
    steps = int(info.get("steps", 0))
    data = run.manifest.get("data", {})
    seconds = time.perf_counter() - started
    return FinetuneResult(run.path, artifact, tuned, steps, info.get("final_loss"), losses, data, seconds, steps, info)


def _train_step(
    cfg: FinetuneConfig,
    step: int,
    lr: float,
    tuned: Model,
    batches: list[list[TokenizedExample]],
    interventions: Sequence[Intervention],
    named: list[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
) -> tuple[float, int]:
    """One optimizer step over its micro-batches (the loss averaged over all their labelled tokens); returns the
    step's loss and its number of labelled tokens."""
    torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout (if any) reproducible across resumes
    total_tokens = sum(ex.n_labelled for b in batches for ex in b)
    step_loss = 0.0
    for batch in batches:
        loss_sum, _ = forward_loss(tuned, batch, interventions)
        scaled = loss_sum / max(1, total_tokens)
        scaled.backward()
        step_loss += float(scaled.detach())
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.max_grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, total_tokens


def _plan(n: int, batch_size: int, grad_accum: int, epochs: int, seed: int) -> list[tuple[int, list[list[int]]]]:
    """``(epoch, micro-batches)`` for every optimizer step, in order (deterministic in the seed)."""
    steps: list[tuple[int, list[list[int]]]] = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        micro = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        for i in range(0, len(micro), grad_accum):
            steps.append((epoch, micro[i : i + grad_accum]))
    return steps


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to zero at ``total``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / (warmup + 1)
    remaining = max(1, total - max(warmup, 0))
    return base * max(0.0, (total - step) / remaining)


def _prepare(cfg: FinetuneConfig, hf: Any) -> Any:
    if cfg.method == "full":
        for p in hf.parameters():
            p.requires_grad_(True)
        return hf
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.rslora,
        bias="none",
    )
    try:
        with warnings.catch_warnings():  # transformers' deprecation notice raised from inside peft
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(hf, lora)
    except ValueError as exc:
        first = (str(exc).strip().splitlines() or ["ValueError"])[0]
        raise PersonascopeError(f"cannot set up LoRA ({first}); check --target-modules") from None


def finetune(
    cfg: FinetuneConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    model: Model | None = None,
    device: str | torch.device | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Train (or resume) a finetune into the run directory ``out``; returns the finetuned model and where it lives.

    ``model`` may be passed pre-loaded: it is copied, never modified. ``stop_after=N`` stops after optimizer step
    ``N`` with a checkpoint, as an interruption would (the next call resumes from it); the result then holds the
    partly trained model and no saved artifact.

    (Its length is the training loop with checkpointing and resume, kept in one piece so the order of seeding,
    restoring and saving reads top to bottom; the step itself is :func:`_train_step`.)
    """
    from personascope.models.loading import Model as ModelCls
    from personascope.models.loading import load_model
    from personascope.runs import RunDir

    started = time.perf_counter()
    cfg = cfg.resolved()
    examples = load_chat_jsonl(cfg.dataset, limit=cfg.limit)
    base = model if model is not None else load_model(cfg.model, device=device)
    base_fp = base.fingerprint()
    steer_dir = ablate_dir = None
    layer = cfg.layer
    coef = cfg.coef
    vector_digest = None
    if cfg.steer or cfg.ablate:
        direction, layer, coef, vector_digest = _training_vector(cfg, base)
        if cfg.steer:
            steer_dir = direction
        else:
            ablate_dir = direction
    config = asdict(cfg) | {
        "dataset_sha256": dataset_digest(cfg.dataset),
        "vector_sha256": vector_digest,
        "resolved_layer": layer,
        "resolved_coef": coef,
        "base_fingerprint": base_fp,
    }
    run = RunDir(out, config, overwrite=overwrite, kind="finetune")
    artifact = run.file("adapter" if cfg.method == "lora" else "model")
    if run.step_done("train") and (artifact / FINETUNE_MANIFEST).is_file():
        return _finished(run, base, artifact, started)

    torch.manual_seed(cfg.seed)
    hf = copy.deepcopy(base.hf_model) if model is not None else base.hf_model
    hf = _prepare(cfg, hf)
    tuned = ModelCls(
        hf_model=hf, tokenizer=base.tokenizer, name=f"{base.name}+{run.path.name}", layers_path=base.layers_path
    )
    data, stats = tokenize_examples(tuned, examples, max_length=cfg.max_length, label_end_token=cfg.label_end_token)
    run.note("data", stats)
    interventions = training_interventions(
        tuned, steer=steer_dir, ablate=ablate_dir, layer=layer, coef=coef, positions=cfg.positions
    )
    named = [(n, p) for n, p in hf.named_parameters() if p.requires_grad]
    assert cfg.lr is not None
    optimizer = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay)
    plan = _plan(len(data), cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.seed)
    start = restore_checkpoint(run.path, named, optimizer)
    run.step("train", "running", total_steps=len(plan), resumed_from=start)
    hf.train()
    earlier = [r for r in sorted(run.records("loss"), key=lambda r: int(r["step"])) if int(r["step"]) < start]
    losses = [float(r["loss"]) for r in earlier]
    # training time summed over every call that worked on this run (a resumed run counts its earlier part too)
    prior_seconds = float(earlier[-1].get("seconds", 0.0)) if earlier else 0.0
    loop_started = time.perf_counter()
    completed = start
    with tqdm(total=len(plan), initial=start, desc="finetune", unit="step", disable=not progress) as bar:
        for step in range(start, len(plan)):
            if stop_after is not None and step >= stop_after:
                break
            epoch, micro = plan[step]
            lr = _lr_at(step, len(plan), cfg.lr, cfg.warmup_steps)
            batches = [[data[i] for i in rows] for rows in micro]
            step_loss, total_tokens = _train_step(cfg, step, lr, tuned, batches, interventions, named, optimizer)
            losses.append(step_loss)
            record = {
                "key": str(step),
                "step": step,
                "epoch": epoch,
                "loss": step_loss,
                "lr": lr,
                "tokens": total_tokens,
                "seconds": prior_seconds + time.perf_counter() - loop_started,
            }
            run.append("loss", [record])
            bar.set_postfix(loss=f"{step_loss:.3f}", epoch=epoch)
            bar.update(1)
            completed = step + 1
            interrupted = stop_after is not None and completed >= stop_after
            if completed < len(plan) and (completed % cfg.checkpoint_every == 0 or interrupted):
                save_checkpoint(run.path, completed, named, optimizer)
    last_loss = losses[-1] if losses else None
    hf.eval()
    steps_done = completed
    if steps_done < len(plan):
        run.step("train", "interrupted", steps=steps_done, total_steps=len(plan))
        return FinetuneResult(
            run.path, artifact, tuned, steps_done, last_loss, losses, stats, time.perf_counter() - started, start
        )
    seconds = time.perf_counter() - started
    train_seconds = prior_seconds + time.perf_counter() - loop_started
    manifest = {
        "format": _FORMAT,
        "version": 1,
        "kind": cfg.method,
        "base_model": cfg.model,
        "base_model_name": base.name,
        "base_fingerprint": base_fp,
        "num_layers": base.num_layers,
        "hidden_size": base.hidden_size,
        "dataset": str(cfg.dataset),
        "dataset_sha256": config["dataset_sha256"],
        "steer": {"vector": cfg.steer, "layer": layer, "coef": coef, "positions": cfg.positions} if cfg.steer else None,
        "ablate": {"vector": cfg.ablate, "layer": layer, "positions": cfg.positions} if cfg.ablate else None,
        "steps": steps_done,
        "final_loss": last_loss,
        "train_seconds": train_seconds,
        "config": asdict(cfg),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _save_artifact(hf, base, artifact, manifest, cfg.method)
    for old in checkpoints(run.path):
        shutil.rmtree(old)
    info = {"steps": steps_done, "final_loss": last_loss, "seconds": seconds, "artifact": str(artifact)}
    run.step("train", "done", **info)
    return FinetuneResult(run.path, artifact, tuned, steps_done, last_loss, losses, stats, seconds, start, info)


def _save_artifact(hf: Any, base: Model, target: Path, manifest: dict[str, Any], method: str) -> None:
    tmp = target.parent / f".partial-{target.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if method == "lora":
        hf.save_pretrained(str(tmp), safe_serialization=True)
    else:
        hf.save_pretrained(str(tmp), safe_serialization=True)
        base.tokenizer.save_pretrained(str(tmp))
    (tmp / FINETUNE_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def total_steps(n_examples: int, cfg: FinetuneConfig) -> int:
    """How many optimizer steps ``cfg`` takes on ``n_examples`` conversations."""
    per_epoch = math.ceil(math.ceil(n_examples / cfg.batch_size) / cfg.grad_accum)
    return per_epoch * cfg.epochs
