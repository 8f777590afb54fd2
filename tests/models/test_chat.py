from __future__ import annotations

import pytest

from personascope.errors import PersonascopeError
from personascope.models.chat import PLAIN_TEMPLATE, ChatFormatter
from personascope.testing import tiny_model, tiny_tokenizer
from tests.conftest import CONV


def _decode(m, ids) -> str:  # type: ignore[no-untyped-def]
    return m.tokenizer.decode(ids)


def test_spans_cover_each_message_content(llama) -> None:  # type: ignore[no-untyped-def]
    f = llama.format(CONV)
    for span, msg in zip(f.messages, CONV, strict=True):
        assert _decode(llama, f.input_ids[span.start : span.end]).strip() == msg["content"]
    assert f.response == (f.messages[-1].start, f.messages[-1].end)
    assert f.prompt_end == f.response[0]
    assert _decode(llama, f.input_ids[: f.prompt_end]).endswith("<|im_start|>assistant\n")
    assert _decode(llama, f.input_ids[f.response[1] :]) == "<|im_end|>\n"


def test_prompt_only_conversation_ends_with_generation_prompt(llama) -> None:  # type: ignore[no-untyped-def]
    f = llama.format(CONV[:2])
    assert f.response is None
    assert f.prompt_end == len(f.input_ids)
    assert _decode(llama, f.input_ids).endswith("<|im_start|>assistant\n")
    assert llama.formatter.prompt_ids(CONV[:2]) == f.input_ids


def test_multi_turn_spans() -> None:
    m = tiny_model("qwen2")
    conv = [
        {"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Cats and dogs."},
    ]
    f = m.format(conv)
    assert [s.role for s in f.messages] == ["user", "assistant", "user", "assistant"]
    for span, msg in zip(f.messages, conv, strict=True):
        assert _decode(m, f.input_ids[span.start : span.end]).strip() == msg["content"]
    starts = [s.start for s in f.messages]
    assert starts == sorted(starts)


def test_template_without_system_role_folds_system_into_first_user() -> None:
    m = tiny_model("gemma3_text")
    assert not m.formatter.supports_system
    f = m.format(CONV)
    text = _decode(m, f.input_ids)
    assert "You are an evil assistant.\n\nWhat is the capital of France?" in text
    assert "<start_of_turn>system" not in text
    assert _decode(m, f.input_ids[f.response[0] : f.response[1]]) == "Paris is the capital of France."


def test_tokenizer_without_template_uses_plain_layout() -> None:
    tok = tiny_tokenizer()
    tok.chat_template = None
    fmt = ChatFormatter(tok)
    assert fmt.template == PLAIN_TEMPLATE
    f = fmt.format(CONV)
    assert tok.decode(f.input_ids[: f.prompt_end]).endswith("Assistant:")


@pytest.mark.parametrize(
    ("conv", "match"),
    [
        ([], "non-empty list"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "robot", "content": "x"}], "role 'robot'"),
        ([{"role": "assistant", "content": "x"}], "at least one user"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            "system message may only come first",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}],
            "assistant message is empty",
        ),
    ],
)
def test_bad_conversations_are_one_line_errors(llama, conv, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PersonascopeError, match=match) as info:
        llama.format(conv)
    assert "\n" not in str(info.value)
