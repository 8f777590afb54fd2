"""Find the decoder blocks of a Hugging Face causal LM.

The residual stream of every supported architecture is the sequence of hidden states that flows between the
entries of one ``nn.ModuleList`` of decoder blocks. This module finds that list for the common families, also when
the model is wrapped by ``peft``, and accepts an explicit dotted path for anything else.
"""

from __future__ import annotations

from torch import nn

from personascope.errors import PersonascopeError

# Dotted paths, tried in order, from the causal-LM object (after unwrapping peft).
KNOWN_LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, olmo2
    "model.language_model.layers",  # gemma3 (multimodal wrapper), llava-style
    "model.decoder.layers",  # opt-style
    "transformer.h",  # gpt2, gpt-j, bloom-style
    "gpt_neox.layers",  # gpt_neox / pythia
    "transformer.blocks",  # mpt-style
    "layers",  # a bare decoder
)


def unwrap_peft(module: nn.Module) -> nn.Module:
    """Return the causal LM inside a peft wrapper (``PeftModel`` → ``LoraModel`` → model), or ``module``."""
    current = module
    for _ in range(3):
        get_base = getattr(current, "get_base_model", None)
        if callable(get_base):
            inner = get_base()
            if isinstance(inner, nn.Module) and inner is not current:
                current = inner
                continue
        break
    return current


def resolve_path(root: nn.Module, path: str) -> object | None:
    obj: object = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def _expected_layer_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int):
            return value
    return None


def _module_lists(model: nn.Module) -> list[tuple[str, int]]:
    return [(name, len(mod)) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList)]


def find_decoder_layers(model: nn.Module, layers_path: str | None = None) -> nn.ModuleList:
    """Return the ``nn.ModuleList`` of decoder blocks of ``model``.

    ``layers_path`` (e.g. ``"model.layers"``) overrides discovery; it is resolved from the unwrapped causal LM.
    An architecture we cannot place raises :class:`PersonascopeError` listing the module lists that were found.
    """
    base = unwrap_peft(model)
    if layers_path is not None:
        found = resolve_path(base, layers_path)
        if not isinstance(found, nn.ModuleList):
            raise PersonascopeError(
                f"layers_path '{layers_path}' does not name an nn.ModuleList in {type(base).__name__}; "
                f"module lists found: {_describe(base)}"
            )
        return found
    expected = _expected_layer_count(base)
    for path in KNOWN_LAYER_PATHS:
        found = resolve_path(base, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0 and (expected is None or len(found) == expected):
            return found
    raise PersonascopeError(
        f"cannot find the decoder blocks of {type(base).__name__} "
        f"(model_type={getattr(getattr(base, 'config', None), 'model_type', '?')}); "
        f"module lists found: {_describe(base)}; pass layers_path='…' naming the right one"
    )


def _describe(model: nn.Module) -> str:
    lists = _module_lists(model)
    if not lists:
        return "none"
    return ", ".join(f"{name} ({n})" for name, n in lists[:12]) + (" …" if len(lists) > 12 else "")
