"""Models: loading by alias / hub id / directory / GGUF, the bundled-model cache, block discovery, chat spans."""

from personascope.models.chat import ChatFormatter, Conversation, FormattedConversation, MessageSpan
from personascope.models.layers import find_decoder_layers, unwrap_peft
from personascope.models.loading import Model, load_model
from personascope.models.registry import BUNDLED, DEFAULT_MODEL, cache_dir, is_cached, list_models, pull

__all__ = [
    "BUNDLED",
    "DEFAULT_MODEL",
    "ChatFormatter",
    "Conversation",
    "FormattedConversation",
    "MessageSpan",
    "Model",
    "cache_dir",
    "find_decoder_layers",
    "is_cached",
    "list_models",
    "load_model",
    "pull",
    "unwrap_peft",
]
