"""Load any Hugging Face causal LM as a :class:`Model`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from personascope.errors import PersonascopeError
from personascope.models import registry
from personascope.models.chat import ChatFormatter, Conversation, FormattedConversation
from personascope.models.layers import find_decoder_layers, unwrap_peft


@dataclass(eq=False)
class Model:
    """A causal LM with what personascope needs to reach its residual stream.

    ``num_layers`` counts decoder blocks; residual-stream layers run from ``0`` (embedding output) to
    ``num_layers`` (output of the last block, *before* the final norm), so a vector has ``num_layers + 1`` rows.
    """

    hf_model: nn.Module
    tokenizer: Any
    name: str
    layers_path: str | None = None
    layers: nn.ModuleList = field(init=False)
    formatter: ChatFormatter = field(init=False)

    def __post_init__(self) -> None:
        self.layers = find_decoder_layers(self.hf_model, self.layers_path)
        self.formatter = ChatFormatter(self.tokenizer)
        if getattr(self.tokenizer, "pad_token_id", None) is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._state: dict[str, Any] = {}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        config: Any = unwrap_peft(self.hf_model).config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        size = getattr(text_config, "hidden_size", None) or getattr(text_config, "n_embd", None)
        if not isinstance(size, int):
            raise PersonascopeError(f"cannot read the hidden size of {self.name} from its config")
        return size

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer <= self.num_layers:
            raise PersonascopeError(
                f"layer {layer} is out of range for {self.name}: use 0 (embeddings) to {self.num_layers} "
                f"(output of the last of its {self.num_layers} blocks)"
            )
        return layer

    def format(self, conversation: Conversation) -> FormattedConversation:
        return self.formatter.format(conversation)

    def fingerprint(self) -> str:
        """A short hash of the weights (names, shapes and a sample of values of every tensor) and the tokenizer.

        Cheap to compute (no full pass over the weights) yet different for any two checkpoints in practice;
        run manifests record it so that a resumed run can tell it is using the same model.
        """
        if "fingerprint" not in self._state:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.hf_model.state_dict().items()):
                flat = tensor.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 4096)][:4096].to("cpu", torch.float32)
                digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
                digest.update(sample.numpy().tobytes())
            digest.update(str(len(self.tokenizer)).encode())
            self._state["fingerprint"] = digest.hexdigest()[:16]
        return str(self._state["fingerprint"])

    def forward_accepts(self, name: str) -> bool:
        """Whether the causal LM's ``forward`` (inside any peft wrapper) takes the keyword ``name`` (cached)."""
        key = f"forward_accepts_{name}"
        if key not in self._state:
            import inspect

            try:
                params = inspect.signature(unwrap_peft(self.hf_model).forward).parameters
                self._state[key] = name in params
            except (TypeError, ValueError):
                self._state[key] = False
        return bool(self._state[key])

    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        gen_config = getattr(self.hf_model, "generation_config", None)
        extra = getattr(gen_config, "eos_token_id", None)
        if isinstance(extra, int):
            ids.add(extra)
        elif isinstance(extra, list):
            ids.update(int(x) for x in extra)
        # chat templates end turns with a special token that is not always the tokenizer's eos
        for token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
            tid = self.tokenizer.convert_tokens_to_ids(token) if token in self.tokenizer.get_vocab() else None
            if isinstance(tid, int):
                ids.add(tid)
        return ids


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "auto": torch.float32,
    }
    if dtype not in table:
        raise PersonascopeError(f"unknown dtype '{dtype}'; use one of {', '.join(table)}")
    return table[dtype]


def load_model(
    spec: str = registry.DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    layers_path: str | None = None,
    pull: bool = True,
) -> Model:
    """Load a model from a bundled alias, a local directory, a ``.gguf`` file or a Hugging Face hub id.

    Bundled aliases are pulled into the cache on first use (``pull=False`` makes a missing one an error).
    ``device`` defaults to CUDA when available; ``dtype`` to float32. ``trust_remote_code`` stays off unless asked.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype)
    target = torch.device(device) if device is not None else _default_device()
    path = Path(spec).expanduser()
    source: Path | str
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    name = spec
    if spec in registry.BUNDLED:
        if not registry.is_cached(spec) and not pull:
            raise PersonascopeError(f"model '{spec}' is not cached; run: personascope models pull {spec}")
        source, tok_kwargs = registry.pull(spec), {}
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise PersonascopeError(f"GGUF file not found: {path}")
        source, tok_kwargs = path.parent, {"gguf_file": path.name}
        kwargs["gguf_file"] = path.name
        name = path.stem
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise PersonascopeError(f"{path} is not a model directory (no config.json)")
        source, tok_kwargs = path, {}
    elif path.exists() or spec.startswith((".", "/", "~")):
        raise PersonascopeError(
            f"'{spec}' is neither a model directory nor a .gguf file; bundled aliases: {', '.join(registry.BUNDLED)}"
        )
    elif "/" not in spec:
        registry.get_bundled(spec)  # raises: unknown alias, listing the bundled ones
        raise AssertionError("unreachable")
    else:
        source, tok_kwargs = spec, {}  # a hub id (org/name)
    hf_model: Any
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code, **tok_kwargs)
        hf_model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PersonascopeError(
            f"could not load model '{spec}' ({first}); bundled aliases: {', '.join(registry.BUNDLED)}"
        ) from exc
    if hasattr(hf_model.config, "quantization_config") and "gguf_file" in kwargs:
        del hf_model.config.quantization_config
        hf_model.hf_quantizer = None
    hf_model.to(target)
    hf_model.eval()
    return Model(hf_model=hf_model, tokenizer=tokenizer, name=name, layers_path=layers_path)


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
