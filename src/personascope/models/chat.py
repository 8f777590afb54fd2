"""Chat formatting with token spans.

A conversation is a list of OpenAI-style ``{"role", "content"}`` messages (roles ``system``, ``user``,
``assistant``). A trailing assistant message is *the response*; everything before it is *the prompt*. We render
with the tokenizer's chat template, tokenise the rendered text once (no extra special tokens, since the template
writes its own), and map every message's content to a token span through the tokenizer's offsets. For templates
without a system role, the system text is folded into the first user turn. Tokenizers without a chat template get a
plain ``System:/User:/Assistant:`` layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from personascope.errors import PersonascopeError

Message = Mapping[str, str]
Conversation = Sequence[Message]

ROLES = ("system", "user", "assistant")

PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}System: {{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass(frozen=True)
class MessageSpan:
    role: str
    start: int  # first token of the message's content
    end: int  # one past its last token


@dataclass(frozen=True)
class FormattedConversation:
    """Token ids of a rendered conversation and where each part lies.

    ``prompt_end`` is the number of prompt tokens: for a conversation ending in an assistant message, the tokens
    before that message's content (template tokens such as ``<|im_start|>assistant\\n`` included); otherwise all
    tokens (rendered with the generation prompt). ``response`` is the token span of the trailing assistant
    message's content, or ``None``.
    """

    input_ids: list[int]
    prompt_end: int
    response: tuple[int, int] | None
    messages: list[MessageSpan] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def last_prompt_index(self) -> int:
        return self.prompt_end - 1


def validate_conversation(conversation: Any, where: str = "conversation") -> list[dict[str, str]]:
    """Check shape and roles; return a plain list of ``{"role", "content"}`` dicts."""
    if not isinstance(conversation, Sequence) or isinstance(conversation, str | bytes) or not conversation:
        raise PersonascopeError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages")
    out: list[dict[str, str]] = []
    for i, msg in enumerate(conversation):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise PersonascopeError(f"{where}: message {i} must be an object with 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise PersonascopeError(f"{where}: message {i} has role '{role}'; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise PersonascopeError(f"{where}: message {i} content must be a string")
        if role == "system" and i != 0:
            raise PersonascopeError(f"{where}: a system message may only come first (message {i})")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in out):
        raise PersonascopeError(f"{where}: needs at least one user message")
    return out


def _fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}" if system else m["content"]
            break
    return rest


class ChatFormatter:
    """Renders conversations for one tokenizer; decides once whether its template accepts a system role."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.template: str | None = getattr(tokenizer, "chat_template", None) or None
        if self.template is None:
            self.template = PLAIN_TEMPLATE
        self.supports_system = self._probe_system()

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return str(text)

    def _probe_system(self) -> bool:
        probe = "personascope-system-probe"
        try:
            text = self._render(
                [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}],
                add_generation_prompt=True,
            )
        except Exception:  # templates that reject the role raise from jinja
            return False
        return probe in text

    def render(self, conversation: Conversation, add_generation_prompt: bool | None = None) -> tuple[str, list]:
        messages = validate_conversation(conversation)
        if not self.supports_system:
            messages = _fold_system(messages)
        if add_generation_prompt is None:
            add_generation_prompt = messages[-1]["role"] != "assistant"
        return self._render(messages, add_generation_prompt), messages

    def format(self, conversation: Conversation) -> FormattedConversation:
        """Render, tokenise and locate every message (see :class:`FormattedConversation`)."""
        text, messages = self.render(conversation)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = list(enc["input_ids"])
        offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
        spans: list[MessageSpan] = []
        cursor = 0
        for m in messages:
            start_char = _find_content(text, m["content"], cursor)
            end_char = start_char + len(m["content"].strip()) if m["content"].strip() else start_char
            spans.append(MessageSpan(m["role"], *_char_to_token_span(offsets, start_char, end_char)))
            cursor = end_char
        response: tuple[int, int] | None = None
        prompt_end = len(ids)
        if messages[-1]["role"] == "assistant":
            last = spans[-1]
            response = (last.start, last.end)
            prompt_end = last.start
            if response[1] <= response[0]:
                raise PersonascopeError("the trailing assistant message is empty; give it content or drop it")
        if prompt_end <= 0:
            raise PersonascopeError("the conversation renders to no prompt tokens")
        return FormattedConversation(ids, prompt_end, response, spans)

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        """Token ids of the prompt ready for generation (ends with the assistant header)."""
        messages = validate_conversation(conversation)
        if messages[-1]["role"] == "assistant":
            raise PersonascopeError("a conversation to generate from must not end with an assistant message")
        return self.format(messages).input_ids


def _find_content(text: str, content: str, cursor: int) -> int:
    needle = content.strip()
    if not needle:
        return cursor
    idx = text.find(needle, cursor)
    if idx < 0:
        raise PersonascopeError(
            "the chat template changed a message's text, so its tokens cannot be located; "
            "use a tokenizer whose template keeps message content verbatim"
        )
    return idx


def _char_to_token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """Tokens overlapping ``[start, end)``; an empty char span maps to the empty span at its position."""
    first = next((i for i, (s, e) in enumerate(offsets) if e > start), len(offsets))
    if end <= start:
        return first, first
    last = first
    while last < len(offsets) and offsets[last][0] < end:
        last += 1
    return first, last
