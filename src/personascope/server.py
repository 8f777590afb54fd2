"""An OpenAI-compatible chat server for one local model, with optional persona-vector steering.

``create_app(model)`` builds a FastAPI app with

* ``GET /v1/models`` (and ``GET /v1/models/{id}``): the one model served;
* ``POST /v1/chat/completions``: OpenAI's request and response format for ``model``, ``messages`` (roles
  ``system``/``user``/``assistant``; content a string or a list of ``{"type": "text", "text": ...}`` parts),
  ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (0 = greedy), ``top_p``, ``seed``, ``n`` (only 1),
  ``logprobs``, ``top_logprobs`` (0-20) and ``stop`` (up to 4 strings). Other OpenAI fields are accepted and
  ignored, except ``stream: true`` (refused). Without ``seed`` a random one is drawn.
* ``GET /health``.

Generation goes through :func:`personascope.generate`: logprobs are log-softmax values of the raw logits (before
temperature and top-p) and cover every generated token except a final end token; ``stop`` strings end generation
inside :func:`~personascope.generate` and are cut from the returned text (their tokens stay in ``logprobs`` and
``usage``).

**Steering.** ``create_app(model, steering=Steering.from_vector(model, vector, layer, coef))`` (CLI: ``personascope
serve --vector FILE [--layer L] [--coef C]``, both defaulting to the vector's chosen ones) adds ``coef · direction``
to the residual stream at layer ``L`` for every request. A
request may override the coefficient with the extension field ``"personascope": {"coef": 2.5}`` (e.g.
``extra_body={"personascope": {"coef": 0}}`` in the OpenAI Python client); that needs a server started with a
vector. Responses then carry ``"personascope": {"layer": L, "coef": c}``.

Requests are served one at a time (the model is not thread-safe): each generation runs in a worker thread under a
lock, so the event loop stays responsive. Errors use OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}``; malformed requests get 400 (an unknown model 404). There is no authentication: bind to loopback (the
default) unless the network is trusted.
"""

from __future__ import annotations

import logging
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from personascope.errors import PersonascopeError
from personascope.generation import Generation, generate
from personascope.models.chat import validate_conversation
from personascope.residual.steering import Steering

if TYPE_CHECKING:
    from personascope.models.loading import Model

__all__ = ["MAX_TOP_LOGPROBS", "Steering", "background_server", "create_app"]

log = logging.getLogger(__name__)

#: The most ``top_logprobs`` a request may ask for (as in OpenAI's API).
MAX_TOP_LOGPROBS = 20
#: The most ``stop`` strings a request may give (as in OpenAI's API).
MAX_STOP = 4


# ---------------------------------------------------------------------- steering


def _public(steering: Steering) -> dict[str, Any]:
    """What clients see of the steering (layers, coefficients, positions; not the vector's file path)."""
    return {k: v for k, v in steering.describe().items() if k != "source"}


# ---------------------------------------------------------------------- request schema

_Finite = Annotated[float, Field(allow_inf_nan=False)]


class _TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[_TextPart]


class _Extension(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    coef: _Finite | None = None


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat-completion request that this server understands (other fields are ignored)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    messages: list[_Message]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    seed: int | None = None
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    personascope: _Extension | None = None


class _APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def _error_response(status: int, message: str, *, type: str, param: str | None, code: str | None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str | None]:
    errors = list(exc.errors())
    if not errors:
        return "invalid request", None, None
    first = errors[0]
    kind = str(first.get("type", ""))
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # drop pydantic's union-branch markers such as 'str' or 'list[_TextPart]' from the location
    loc = [p for p in loc if not (p in _TYPE_TAGS or "[" in p or p[:1] == "_" or p[:1].isupper())]
    param = ".".join(loc) or None
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        detail = f" ({ctx['error']})" if isinstance(ctx, dict) and ctx.get("error") else ""
        return f"the request body is not valid JSON{detail}", None, "invalid_json"
    if kind == "missing":
        return f"missing required parameter '{param}'", param, "missing_required_parameter"
    where = f"'{param}'" if param else "the request body"
    msg = str(first.get("msg", "invalid value"))
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"invalid value for {where}: {msg}{more}", param, "invalid_value"


# ---------------------------------------------------------------------- token text and bytes


def _byte_level_table() -> dict[str, int]:
    """The inverse of the byte-to-printable-character map used by byte-level BPE tokenizers."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class _TokenBytes:
    """The exact bytes of one token (byte-level BPE, sentencepiece byte fallback, or decoded text)."""

    _HEX = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder_desc = ""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        if decoder is not None:
            try:
                decoder_desc = decoder.__getstate__().decode("utf-8", "replace")
            except Exception:  # a decoder we cannot introspect: fall back to decoding text
                decoder_desc = ""
        self.byte_level = '"ByteLevel"' in decoder_desc
        self.metaspace = "▁" in decoder_desc or '"Metaspace"' in decoder_desc
        self.table = _byte_level_table() if self.byte_level else {}
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        if token_id not in self.cache:
            self.cache[token_id] = self._compute(token_id)
        return self.cache[token_id]

    def _compute(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return str(self.tokenizer.decode([token_id])).encode("utf-8")
        if token_id in self.special:
            return piece.encode("utf-8")
        if self.byte_level and piece and all(c in self.table for c in piece):
            return bytes(self.table[c] for c in piece)
        hexed = self._HEX.fullmatch(piece)
        if hexed:
            return bytes([int(hexed.group(1), 16)])
        if self.metaspace:
            return piece.replace("▁", " ").encode("utf-8")
        return str(self.tokenizer.decode([token_id])).encode("utf-8")


def _token_entry(token_bytes: _TokenBytes, token_id: int, logprob: float) -> dict[str, Any]:
    raw = token_bytes(token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


# ---------------------------------------------------------------------- the app


def _context_length(model: Model) -> int | None:
    config: Any = getattr(model.hf_model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def create_app(
    model: Model,
    *,
    model_id: str | None = None,
    steering: Steering | None = None,
    max_tokens_limit: int = 2048,
) -> FastAPI:
    """An OpenAI-compatible FastAPI app serving ``model`` as ``model_id`` (default: the model's name).

    ``steering`` applies to every request (a request may override its coefficient, see the module docs);
    ``max_tokens_limit`` caps ``max_tokens`` (and is the default when a request gives none, within the context).

    (Long because the route handlers are closures over this app's model, lock and steering: each is short, and
    keeping them here keeps one app's state out of module globals.)
    """
    if max_tokens_limit < 1:
        raise PersonascopeError(f"max_tokens_limit must be at least 1, got {max_tokens_limit}")
    served = model_id or model.name
    created = int(time.time())
    lock = threading.Lock()
    token_bytes = _TokenBytes(model.tokenizer)
    context = _context_length(model)
    app = FastAPI(title="personascope", description="OpenAI-compatible chat completions with persona steering")
    app.state.model = model
    app.state.model_id = served
    app.state.steering = steering
    app.state.generation_lock = lock  # held while a request generates

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return _error_response(400, message, type="invalid_request_error", param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(exc.status_code, str(exc.detail), type=kind, param=None, code=code)

    @app.exception_handler(_APIError)
    async def _on_api_error(request: Request, exc: _APIError) -> JSONResponse:
        return _error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)

    def model_card() -> dict[str, Any]:
        card: dict[str, Any] = {"id": served, "object": "model", "created": created, "owned_by": "personascope"}
        if steering is not None:
            card["personascope"] = {"steering": _public(steering)}
        return card

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        if name != served:
            raise _APIError(404, f"model '{name}' is not served here; use '{served}'", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> dict[str, Any]:
        job = _plan(body)
        return await run_in_threadpool(_run, job)

    def _plan(body: ChatCompletionRequest) -> dict[str, Any]:
        """Check everything that does not need the model; return the generation arguments."""
        if body.model is not None and body.model != served:
            raise _APIError(
                404, f"model '{body.model}' is not served here; use '{served}'", param="model", code="model_not_found"
            )
        if body.stream:
            raise _APIError(400, "streaming is not supported; send 'stream': false", param="stream")
        if body.n is not None and body.n != 1:
            raise _APIError(400, f"only n=1 is supported, got n={body.n}", param="n", code="unsupported_value")
        if body.top_logprobs is not None and body.top_logprobs > 0 and not body.logprobs:
            raise _APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise _APIError(400, f"'stop' takes up to {MAX_STOP} non-empty strings", param="stop")
        messages = [
            {
                "role": m.role,
                "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content),
            }
            for m in body.messages
        ]
        try:
            conversation = validate_conversation(messages, "messages")
        except PersonascopeError as exc:
            raise _APIError(400, str(exc), param="messages") from None
        if conversation[-1]["role"] == "assistant":
            raise _APIError(400, "the last message must not be from the assistant", param="messages")
        both = body.max_tokens is not None and body.max_completion_tokens is not None
        if both and body.max_tokens != body.max_completion_tokens:
            raise _APIError(400, "give 'max_tokens' or 'max_completion_tokens', not both", param="max_tokens")
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if asked is not None and asked > max_tokens_limit:
            raise _APIError(
                400,
                f"max_tokens is {asked}; this server allows at most {max_tokens_limit}",
                param="max_tokens",
                code="invalid_value",
            )
        coef = body.personascope.coef if body.personascope is not None else None
        if coef is not None and steering is None:
            raise _APIError(
                400,
                "this server has no steering vector, so 'personascope.coef' cannot be used; "
                "start it with --vector FILE --layer L --coef C",
                param="personascope.coef",
            )
        want_logprobs = bool(body.logprobs)
        return {
            "conversation": conversation,
            "max_tokens": asked,
            "temperature": 1.0 if body.temperature is None else float(body.temperature),
            "top_p": 1.0 if body.top_p is None else float(body.top_p),
            "seed": body.seed if body.seed is not None else secrets.randbelow(2**31),
            "logprobs": want_logprobs,
            "top_logprobs": (body.top_logprobs or 0) if want_logprobs else 0,
            "stop": stops,
            "coef": coef,
        }

    def _run(job: dict[str, Any]) -> dict[str, Any]:
        with lock:
            try:
                prompt_len = len(model.formatter.prompt_ids(job["conversation"]))
            except PersonascopeError as exc:
                raise _APIError(400, str(exc), param="messages") from None
            room = max_tokens_limit if context is None else min(max_tokens_limit, context - prompt_len)
            max_new = job["max_tokens"] if job["max_tokens"] is not None else room
            if context is not None and prompt_len + max_new > context:
                raise _APIError(
                    400,
                    f"the prompt has {prompt_len} tokens and max_tokens is {max_new}, more than the model's "
                    f"context of {context} tokens; shorten the messages or lower max_tokens",
                    param="messages",
                    code="context_length_exceeded",
                )
            active = steering if steering is None or job["coef"] is None else steering.with_coef(job["coef"])
            interventions = active.interventions() if active is not None else []
            try:
                gen = generate(
                    model,
                    [job["conversation"]],
                    max_new_tokens=max_new,
                    temperature=job["temperature"],
                    top_p=job["top_p"],
                    seed=job["seed"],
                    interventions=interventions,
                    progress=False,
                    top_logprobs=max(1, job["top_logprobs"]) if job["logprobs"] else 0,
                    stop=job["stop"],
                )[0]
            except PersonascopeError as exc:
                raise _APIError(400, str(exc)) from None
            except Exception:
                log.exception("generation failed")
                raise _APIError(500, "generation failed; see the server log", type="server_error") from None
        return _response(gen, job, active)

    def _response(gen: Generation, job: dict[str, Any], active: Steering | None) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": gen.text},
            "logprobs": None,
            "finish_reason": "stop" if gen.finished or gen.stop is not None else "length",
        }
        if job["logprobs"] and gen.logprobs is not None:
            steps = gen.logprobs[:-1] if gen.finished else gen.logprobs
            k = job["top_logprobs"]
            choice["logprobs"] = {
                "content": [
                    {
                        **_token_entry(token_bytes, step.token_id, step.logprob),
                        "top_logprobs": [_token_entry(token_bytes, t, lp) for t, lp in step.top[:k]],
                    }
                    for step in steps
                ],
                "refusal": None,
            }
        completion = len(gen.response_ids)
        out: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served,
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(gen.prompt_ids),
                "completion_tokens": completion,
                "total_tokens": len(gen.prompt_ids) + completion,
            },
        }
        if active is not None:
            out["personascope"] = {k: v for k, v in _public(active).items() if k != "positions"}
        return out

    return app


# ---------------------------------------------------------------------- running


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise PersonascopeError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    return sock


@contextmanager
def background_server(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yields its base URL (``http://HOST:PORT/v1``).

    ``port=0`` picks a free port. The server stops when the block exits. Handy in notebooks and tests.
    """
    import uvicorn

    sock = _bind(host, port)
    actual_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="personascope-serve")
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise PersonascopeError(f"the server on {host}:{actual_port} did not start")
            time.sleep(0.01)
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{actual_port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def serve(
    model: Model,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_id: str | None = None,
    steering: Steering | None = None,
    max_tokens_limit: int = 2048,
    log_level: str = "info",
) -> None:
    """Serve ``model`` over HTTP until interrupted (blocking)."""
    import uvicorn

    app = create_app(model, model_id=model_id, steering=steering, max_tokens_limit=max_tokens_limit)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
