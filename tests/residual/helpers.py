"""Expected token positions from an independent source: the chat spans, checked by decoding.

The engine's own role function (``roles_for``) is what these tests check, so expected positions never come from
it. ``checked_spans`` takes the formatter's spans and proves them by decoding: the prompt tokens decode to the
chat template's rendering with the generation prompt, and the response span decodes to the answer text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from personascope.models.loading import Model
from personascope.residual.positions import OTHER, PROMPT, PROMPT_LAST, RESPONSE


@dataclass(frozen=True)
class Spans:
    ids: list[int]
    prompt_end: int  # number of prompt tokens; the last prompt token is prompt_end - 1
    response: tuple[int, int] | None  # the answer's tokens, end exclusive

    def expected(self, positions: str) -> set[int]:
        """Token indices a ``positions`` mode must touch, from the spans alone."""
        prompt = set(range(self.prompt_end))
        response = set(range(*self.response)) if self.response is not None else set()
        return {
            "all": set(range(len(self.ids))),
            "prompt": prompt,
            "response": response,
            "last_prompt_and_response": {self.prompt_end - 1} | response,
        }[positions]


def checked_spans(model: Model, conversation: list[dict[str, str]]) -> Spans:
    tok = model.tokenizer
    f = model.format(conversation)
    prompt_msgs = conversation[:-1] if conversation[-1]["role"] == "assistant" else conversation
    if not model.formatter.supports_system and prompt_msgs[0]["role"] == "system":
        rendered, _ = model.formatter.render(prompt_msgs, add_generation_prompt=True)
    else:
        rendered = tok.apply_chat_template(
            prompt_msgs, chat_template=model.formatter.template, tokenize=False, add_generation_prompt=True
        )
    prompt_ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert f.input_ids[: len(prompt_ids)] == prompt_ids, "the prompt tokens are not a prefix of the conversation"
    assert f.prompt_end == len(prompt_ids), "prompt_end is not the end of the rendered prompt"
    assert tok.decode(f.input_ids[: f.prompt_end]) == rendered
    if conversation[-1]["role"] == "assistant":
        assert f.response is not None
        start, end = f.response
        assert start == f.prompt_end
        assert tok.decode(f.input_ids[start:end]).strip() == conversation[-1]["content"].strip()
        assert tok.decode(f.input_ids[start : end - 1]).strip() != conversation[-1]["content"].strip()
    return Spans(list(f.input_ids), f.prompt_end, f.response)


def hand_roles(spans: Spans) -> list[int]:
    """Every token's role as the engine documents it, written out from the spans."""
    roles = [OTHER] * len(spans.ids)
    for t in range(spans.prompt_end):
        roles[t] = PROMPT
    roles[spans.prompt_end - 1] = PROMPT_LAST
    if spans.response is not None:
        for t in range(*spans.response):
            roles[t] = RESPONSE
    return roles


def as_batch(spans: Spans) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([spans.ids]), torch.tensor([hand_roles(spans)])
