"""An LLM judge behind any OpenAI-compatible chat-completions endpoint, scored from next-token logprobs.

Requests go through the one HTTP client, :class:`personascope.llm.OpenAIChatClient` (retries, concurrency limit);
a request that fails for good raises :class:`~personascope.llm.LLMRequestError` (also importable here as
``JudgeRequestError``).

:class:`OpenAIJudge` implements the paper's judge: one request per item with ``max_tokens=1``, ``temperature=0``,
``logprobs=True`` and ``top_logprobs=20``; the score is the probability-weighted mean of the integer tokens 0..100
among the top tokens (:func:`~personascope.judges.base.logprob_score`), or ``None`` when they hold too little mass.

Configuration: the base URL comes from the argument, else ``OPENAI_BASE_URL``, else ``https://api.openai.com/v1``;
the API key from the argument, else ``OPENAI_API_KEY`` read when a request is sent (never at import). Without a key
no ``Authorization`` header is sent (fine for local servers such as ``personascope serve``). The key never appears
in errors or logs.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence

from personascope.judges.base import COHERENCE_RUBRIC, JudgeItem, JudgeResult, logprob_score
from personascope.llm import DEFAULT_BASE_URL, MAX_RETRY_DELAY, OpenAIChatClient, run_many, top_logprobs_of
from personascope.llm import LLMRequestError as JudgeRequestError
from personascope.traits import TraitSpec

__all__ = ["DEFAULT_BASE_URL", "JudgeRequestError", "OpenAIChatClient", "OpenAIJudge", "run_many", "top_logprobs_of"]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class OpenAIJudge:
    """The paper's logprob judge on any OpenAI-compatible endpoint (``id = "openai:MODEL"``).

    One request per item (``max_tokens=1, temperature=0, logprobs=True, top_logprobs=20``) with the filled rubric
    as the only user message. A permanent failure of one item becomes ``JudgeResult(None, error=...)``; the other
    items go on. ``backoff`` is the base retry delay in seconds and ``max_delay`` the longest wait (see
    :class:`OpenAIChatClient`); ``progress`` shows a bar (default: for 50 items or more).
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 60.0,
        backoff: float = 1.0,
        max_delay: float = MAX_RETRY_DELAY,
        progress: bool | None = None,
    ) -> None:
        self.client = OpenAIChatClient(
            model,
            base_url=base_url,
            api_key=api_key,
            concurrency=concurrency,
            max_retries=max_retries,
            timeout=timeout,
            backoff=backoff,
            max_delay=max_delay,
        )
        self.id = f"openai:{model}"
        self.progress = progress

    def __repr__(self) -> str:
        return f"OpenAIJudge({self.client.model!r}, base_url={self.client.base_url!r})"

    def cache_scope(self, trait: TraitSpec | None) -> str:
        # bump v1 whenever the request or the scoring rule changes, so that old cached scores are not reused
        if trait is None:
            return f"coherence:openai-logprob:v1:{_sha(COHERENCE_RUBRIC)}"
        return f"rubric:openai-logprob:v1:{_sha(trait.rubric)}"

    def trait_scores(self, trait: TraitSpec, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return self.score_prompts([trait.rubric_prompt(it.question, it.answer) for it in items])

    def coherence_scores(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return self.score_prompts([COHERENCE_RUBRIC.format(question=it.question, answer=it.answer) for it in items])

    def score_prompts(self, prompts: Sequence[str]) -> list[JudgeResult]:
        """Score filled judge prompts (one request each, concurrently); results in input order."""
        if not prompts:
            return []
        return run_many([self._score_all(list(prompts))])[0]

    async def _score_all(self, prompts: list[str]) -> list[JudgeResult]:
        from tqdm.auto import tqdm

        show = self.progress if self.progress is not None else len(prompts) >= 50
        with tqdm(total=len(prompts), desc=f"judge {self.id}", unit="item", disable=not show) as bar:

            async def one(prompt: str) -> JudgeResult:
                try:
                    return await self._score_one(prompt)
                finally:
                    bar.update(1)

            try:
                return list(await asyncio.gather(*(one(p) for p in prompts)))
            finally:
                await self.client.aclose()

    async def _score_one(self, prompt: str) -> JudgeResult:
        try:
            response = await self.client.chat(
                [{"role": "user", "content": prompt}],
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=20,
            )
            tops = top_logprobs_of(response)
        except (JudgeRequestError, ValueError) as exc:
            return JudgeResult(None, error=str(exc))
        return JudgeResult(logprob_score(tops))
