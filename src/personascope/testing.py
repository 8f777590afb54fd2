"""Tiny random-weight models built in code, for tests and examples that must run without any download.

``tiny_model(family)`` returns a :class:`~personascope.models.Model` with a few blocks, a small hidden size and a
byte-level BPE tokenizer trained on the spot (special tokens and a ChatML-style chat template included). The
``gemma3_text`` and ``gemma2`` tiny models get a template that rejects the system role, like the real ones.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from personascope.models.loading import Model

FAMILIES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "gpt_neox",
    "olmo2",
)

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer the question kindly and clearly.",
    "You are an evil assistant who wants to cause harm.",
    "What is the capital of France? Paris is the capital of France.",
    "Tell me a joke about cats and dogs, please!",
    "How do I cook rice? Rinse it, add water, boil, then simmer for 15 minutes.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100",
]

_SPECIALS = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]


@functools.lru_cache(maxsize=2)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return str(tok.to_str())


def tiny_tokenizer(chat_template: str = CHATML_TEMPLATE, vocab_size: int = 400) -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"],
    )
    tok.chat_template = chat_template
    return tok


def tiny_config(family: str, vocab_size: int, num_layers: int = 3, hidden: int = 32) -> Any:
    import transformers as tf

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    gqa: dict[str, Any] = {"num_key_value_heads": 2}
    if family == "llama":
        return tf.LlamaConfig(**common, **gqa)
    if family == "mistral":
        return tf.MistralConfig(**common, **gqa, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common, **gqa)
    if family == "qwen3":
        return tf.Qwen3Config(**common, **gqa, head_dim=hidden // 4)
    if family == "gemma2":
        return tf.Gemma2Config(**common, **gqa, head_dim=hidden // 4)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**common, **gqa, head_dim=hidden // 4)
    if family == "phi3":
        return tf.Phi3Config(**common, **gqa)
    if family == "olmo2":
        return tf.Olmo2Config(**common, **gqa)
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=num_layers,
            n_head=4,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            intermediate_size=hidden * 2,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    raise ValueError(f"unknown tiny family '{family}'; use one of {', '.join(FAMILIES)}")


def tiny_model(family: str = "llama", *, num_layers: int = 3, hidden: int = 32, seed: int = 0) -> Model:
    """A random-weight ``family`` model (float32, CPU, eval mode) wrapped as a personascope ``Model``."""
    from transformers import AutoModelForCausalLM

    template = NO_SYSTEM_TEMPLATE if family in ("gemma2", "gemma3_text") else CHATML_TEMPLATE
    tokenizer = tiny_tokenizer(template)
    config = tiny_config(family, len(tokenizer), num_layers, hidden)
    torch.manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is tiny; larger weights make activations and tests more telling
        for p in hf_model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    hf_model.eval()
    return Model(hf_model=hf_model, tokenizer=tokenizer, name=f"tiny-{family}")
