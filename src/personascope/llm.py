"""The one OpenAI-compatible HTTP client: async chat completions with a concurrency limit and retries.

Used by the judges (:mod:`personascope.judges.openai`), trait generation (:mod:`personascope.traits.generate`) and
anything else that talks to an OpenAI-compatible server (vLLM, SGLang, llama.cpp, ``personascope serve``), so it
sits below all of them. 429, 5xx, timeouts and connection errors are retried with exponential backoff and jitter
(a server's ``Retry-After`` is honoured, capped); any other 4xx is permanent and raises :class:`LLMRequestError`
with the status and the server's message.

Configuration: the base URL comes from the argument, else ``OPENAI_BASE_URL``, else ``https://api.openai.com/v1``;
the API key from the argument, else ``OPENAI_API_KEY`` read when a request is sent (never at import). Without a key
no ``Authorization`` header is sent (fine for local servers). The key never appears in errors or logs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import logging
import math
import os
import random
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import httpx

from personascope.errors import PersonascopeError

__all__ = ["DEFAULT_BASE_URL", "LLMRequestError", "OpenAIChatClient", "run_many", "top_logprobs_of"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: The longest wait between attempts, whatever the backoff or the server's ``Retry-After`` says.
MAX_RETRY_DELAY = 60.0

log = logging.getLogger(__name__)
T = TypeVar("T")


class LLMRequestError(PersonascopeError):
    """A request that failed for good: a permanent 4xx, or retries used up. ``status`` is the HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def run_many(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run coroutines concurrently and return their results in order, from synchronous code.

    Works with or without a running event loop (in a notebook or inside an async server, the coroutines run on a
    fresh loop in a worker thread while the caller waits). The first exception is raised.
    """
    coros = list(coroutines)

    async def gather() -> list[T]:
        return list(await asyncio.gather(*coros))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="personascope-run-many") as pool:
        return pool.submit(asyncio.run, gather()).result()


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date), if the server said."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value):
                return max(0.0, value)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
        return max(0.0, value) if math.isfinite(value) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return _one_line(response.text) or response.reason_phrase
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping) and isinstance(err.get("message"), str):
            return _one_line(err["message"])
        if isinstance(err, str):
            return _one_line(err)
        if isinstance(body.get("detail"), str):
            return _one_line(body["detail"])
    return _one_line(response.text)


class OpenAIChatClient:
    """Async client for ``POST {base_url}/chat/completions`` with a concurrency limit and retries.

    ``await client.chat(messages, **params)`` returns the response JSON; ``params`` go into the request body
    (``max_tokens``, ``temperature``, ``logprobs``, …). At most ``concurrency`` requests are in flight at once
    (per event loop). Retryable failures are tried ``1 + max_retries`` times, waiting
    ``backoff · 2^attempt · U(0.5, 1.5)`` seconds (or the server's ``Retry-After``), capped at ``max_delay``
    (default :data:`MAX_RETRY_DELAY`). Call :meth:`aclose` (or use ``async with``) when done on a loop of your own.
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
    ) -> None:
        if not model:
            raise PersonascopeError("the OpenAI-compatible client needs a model name (e.g. openai:gpt-4.1-mini)")
        if concurrency < 1:
            raise PersonascopeError(f"concurrency must be at least 1, got {concurrency}")
        if max_retries < 0:
            raise PersonascopeError(f"max_retries must be 0 or more, got {max_retries}")
        if timeout <= 0 or backoff < 0 or max_delay < 0:
            raise PersonascopeError("timeout must be positive, backoff and max_delay non-negative")
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise PersonascopeError(f"base URL {self.base_url!r} must start with http:// or https://")
        self._api_key = api_key
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff = backoff
        self.max_delay = max_delay
        # httpx clients and semaphores belong to one event loop; keep one of each per loop
        self._per_loop: dict[int, tuple[asyncio.AbstractEventLoop, httpx.AsyncClient, asyncio.Semaphore]] = {}

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIChatClient(model={self.model!r}, base_url={self.base_url!r})"

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def _key(self) -> str | None:
        return self._api_key or os.environ.get("OPENAI_API_KEY") or None

    def _redact(self, text: str) -> str:
        key = self._key()
        return text.replace(key, "***") if key else text

    def _state(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        for ident, (other, _, _) in list(self._per_loop.items()):
            if other.is_closed():
                del self._per_loop[ident]
        entry = self._per_loop.get(id(loop))
        if entry is None or entry[0] is not loop:
            entry = (loop, httpx.AsyncClient(timeout=self.timeout), asyncio.Semaphore(self.concurrency))
            self._per_loop[id(loop)] = entry
        return entry[1], entry[2]

    async def aclose(self) -> None:
        """Close the HTTP connections opened on the running loop."""
        entry = self._per_loop.pop(id(asyncio.get_running_loop()), None)
        if entry is not None:
            await entry[1].aclose()

    async def __aenter__(self) -> OpenAIChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_delay)
        return min(self.backoff * (2**attempt) * (0.5 + random.random()), self.max_delay)

    async def chat(self, messages: Sequence[Mapping[str, str]], **params: Any) -> dict[str, Any]:
        """Send one chat completion request and return the response JSON (retrying transient failures)."""
        body: dict[str, Any] = {"model": self.model, "messages": [dict(m) for m in messages], **params}
        headers = {"Content-Type": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        client, semaphore = self._state()
        async with semaphore:
            attempt = 0
            while True:
                try:
                    response = await client.post(self.url, json=body, headers=headers)
                except httpx.TransportError as exc:  # timeouts, refused or dropped connections
                    problem = f"{type(exc).__name__}: {_one_line(str(exc)) or 'no detail'}"
                    retry_after, last_status = None, None
                else:
                    status = response.status_code
                    if status < 300:
                        try:
                            data = response.json()
                        except ValueError:
                            raise LLMRequestError(
                                f"{self.url} answered {status} with a body that is not JSON", status
                            ) from None
                        if not isinstance(data, dict):
                            raise LLMRequestError(f"{self.url} answered {status} with JSON that is not an object")
                        return data
                    message = self._redact(_server_message(response))
                    if status != 429 and status < 500:
                        raise LLMRequestError(f"{self.url} answered {status}: {message}", status)
                    problem = f"HTTP {status}: {message}"
                    retry_after, last_status = _retry_after(response.headers), status
                if attempt >= self.max_retries:
                    raise LLMRequestError(
                        f"{self.url} failed after {attempt + 1} attempts ({self._redact(problem)})", last_status
                    )
                delay = self._delay(attempt, retry_after)
                log.info("retrying %s in %.2fs (%s)", self.url, delay, self._redact(problem))
                attempt += 1
                await asyncio.sleep(delay)


def top_logprobs_of(response: Mapping[str, Any]) -> dict[str, float]:
    """``{token: logprob}`` of the first generated token of a chat completion (tokens that read the same are merged).

    Raises ``ValueError`` when the response carries no logprobs.
    """
    try:
        entries = response["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(
            "the response has no choices[0].logprobs.content[0].top_logprobs; "
            "use a model and server that return logprobs"
        ) from None
    out: dict[str, float] = {}
    for entry in entries or []:
        if not isinstance(entry, Mapping):
            continue
        token, logprob = entry.get("token"), entry.get("logprob")
        if not isinstance(token, str) or not isinstance(logprob, int | float) or isinstance(logprob, bool):
            continue
        value = float(logprob)
        if token in out:  # two token ids that decode to the same text: add their probabilities
            hi, lo = max(out[token], value), min(out[token], value)
            value = hi + math.log1p(math.exp(lo - hi)) if math.isfinite(lo) else hi
        out[token] = value
    return out
