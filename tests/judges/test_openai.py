"""OpenAIJudge over real loopback HTTP: against `personascope serve` with a tiny model, and against a scripted stub."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import personascope
from personascope import llm as llm_module
from personascope.judges.base import COHERENCE_RUBRIC, JudgeItem, logprob_score
from personascope.judges.openai import (
    JudgeRequestError,
    OpenAIChatClient,
    OpenAIJudge,
    run_many,
    top_logprobs_of,
)
from personascope.server import Steering, background_server, create_app
from personascope.testing import tiny_model
from personascope.traits import load_trait

KEY = "sk-test-SECRET-0123456789"
#: How long a scripted handler waits for an event before giving up: only a guard against hanging, never measured.
GUARD_S = 20.0
ITEMS = [JudgeItem("What is the capital of France?", "Paris."), JudgeItem("Tell me a joke.", "Cats and dogs!")]


# ---------------------------------------------------------------------- against personascope serve


@pytest.fixture(scope="module")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> personascope.Model:
    path = tmp_path_factory.mktemp("judge-model")
    m = tiny_model("llama")
    hf: Any = m.hf_model
    hf.config.max_position_embeddings = 1024  # room for the rubrics (RoPE: no position table to outgrow)
    hf.save_pretrained(path)
    m.tokenizer.save_pretrained(path)
    return personascope.load_model(str(path), device="cpu")


def _judge_request(url: str, prompt: str) -> dict[str, Any]:
    body = {
        "model": "tiny-judge",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 20,
    }
    response = httpx.post(f"{url}/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _digit_mass(tops: dict[str, float]) -> float:
    return sum(math.exp(v) for k, v in tops.items() if k.strip().isdigit() and int(k.strip()) <= 100)


def test_scores_from_a_random_model_follow_the_mass_rule(served_model: personascope.Model) -> None:
    trait = load_trait("evil")
    with background_server(create_app(served_model, model_id="tiny-judge")) as url:
        judge = OpenAIJudge("tiny-judge", base_url=url, api_key=None)
        results = judge.trait_scores(trait, ITEMS)
        coherence = judge.coherence_scores(ITEMS)
        for item, result, coh in zip(ITEMS, results, coherence, strict=True):
            assert result.error is None and coh.error is None
            tops = top_logprobs_of(_judge_request(url, trait.rubric_prompt(item.question, item.answer)))
            assert len(tops) <= 20
            # a random model puts little mass on numbers: then there is no score, else the weighted mean
            if _digit_mass(tops) < 0.25:
                assert result.score is None
            else:
                assert result.score == pytest.approx(logprob_score(tops))
            coh_tops = top_logprobs_of(
                _judge_request(url, COHERENCE_RUBRIC.format(question=item.question, answer=item.answer))
            )
            assert coh.score == (None if _digit_mass(coh_tops) < 0.25 else pytest.approx(logprob_score(coh_tops)))


def test_a_model_steered_toward_digits_gets_a_weighted_score(served_model: personascope.Model) -> None:
    tok = served_model.tokenizer
    hf: Any = served_model.hf_model
    head = hf.get_output_embeddings().weight.detach()
    four, seven = tok.convert_tokens_to_ids("4"), tok.convert_tokens_to_ids("7")
    direction = head[four] + 0.7 * head[seven]  # push the last residual layer toward "4", a little less toward "7"
    steering = Steering.from_vector(served_model, direction, served_model.num_layers, 60.0)
    trait = load_trait("evil")
    with background_server(create_app(served_model, model_id="tiny-judge", steering=steering)) as url:
        result = OpenAIJudge("tiny-judge", base_url=url).trait_scores(trait, ITEMS[:1])[0]
        tops = top_logprobs_of(_judge_request(url, trait.rubric_prompt(ITEMS[0].question, ITEMS[0].answer)))
    assert _digit_mass(tops) >= 0.25
    assert result.error is None and result.score is not None
    assert result.score == pytest.approx(logprob_score(tops))
    assert 4.0 < result.score < 7.0  # mostly "4", some "7"


# ---------------------------------------------------------------------- against a scripted stub


def _payload(top: dict[str, float]) -> dict[str, Any]:
    first = next(iter(top))
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": "stub",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": first},
                "finish_reason": "length",
                "logprobs": {
                    "content": [
                        {
                            "token": first,
                            "logprob": top[first],
                            "bytes": list(first.encode()),
                            "top_logprobs": [
                                {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top.items()
                            ],
                        }
                    ]
                },
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


GOOD = {"50": math.log(0.5), "100": math.log(0.3), "maybe": math.log(0.2)}
GOOD_SCORE = (50 * 0.5 + 100 * 0.3) / 0.8


class Stub:
    """A scripted OpenAI-compatible server; behaviour is chosen by a marker word in the prompt.

    ``GATE`` requests wait until ``gate`` requests are in flight at once; the first ``HANG`` request waits until the
    client gives up on it and sends the second. Both waits are bounded by :data:`GUARD_S`; a wait that runs out is
    counted in ``guard_expired`` (and the gate opens, so a failing test does not crawl).
    """

    def __init__(self, gate: int = 3) -> None:
        self.requests: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate = gate
        self.gate_open = asyncio.Event()
        self.hang_retried = asyncio.Event()
        self.guard_expired: Counter[str] = Counter()
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.handle)

    async def handle(self, request: Request) -> JSONResponse:
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        marker = next((w for w in prompt.split() if w.isupper() and len(w) > 2), "OK")
        self.requests.append({"headers": dict(request.headers), "body": body, "marker": marker})
        self.counts[marker] += 1
        n = self.counts[marker]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.in_flight >= self.gate:
            self.gate_open.set()
        try:
            return await self.respond(marker, n, request)
        finally:
            self.in_flight -= 1

    async def respond(self, marker: str, n: int, request: Request) -> JSONResponse:
        auth = request.headers.get("authorization", "")
        if marker == "FLAKY" and n == 1:
            return JSONResponse({"error": {"message": "slow down"}}, status_code=429, headers={"Retry-After": "0.3"})
        if marker == "FLAKY" and n == 2:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=500)
        if marker == "HUGEWAIT" and n == 1:
            return JSONResponse({"error": {"message": "later"}}, status_code=429, headers={"Retry-After": "3600"})
        if marker == "DOWN":
            return JSONResponse({"error": {"message": f"unavailable for {auth}"}}, status_code=503)
        if marker == "BAD":
            return JSONResponse({"error": {"message": "Invalid parameter: messages", "type": "x"}}, status_code=400)
        if marker == "LEAKY":
            return JSONResponse({"error": {"message": f"Incorrect API key provided: {auth}"}}, status_code=401)
        if marker == "LEAKYRETRY" and n == 1:
            return JSONResponse({"error": {"message": f"rate limited for {auth}"}}, status_code=429)
        if marker == "GATE" and not await self._wait(self.gate_open, "GATE"):
            self.gate_open.set()
        if marker == "HANG" and n == 1:
            await self._wait(self.hang_retried, "HANG")  # answer only once the client has timed out and retried
        if marker == "HANG" and n > 1:
            self.hang_retried.set()
        if marker == "NOLOGPROBS":
            payload = _payload(GOOD)
            payload["choices"][0]["logprobs"] = None
            return JSONResponse(payload)
        if marker == "WORDS":
            return JSONResponse(_payload({"Sure": math.log(0.8), "5": math.log(0.1)}))
        return JSONResponse(_payload(GOOD))

    async def _wait(self, event: asyncio.Event, marker: str) -> bool:
        try:
            await asyncio.wait_for(event.wait(), timeout=GUARD_S)
        except TimeoutError:
            self.guard_expired[marker] += 1
            return False
        return True


class SleepSpy:
    """Stands in for ``asyncio`` inside the judge module and records every delay the client sleeps between attempts.

    The real sleep is capped at a second, so a client that computes a huge wait fails the test instead of hanging.
    """

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def sleep(self, delay: float, result: Any = None) -> Any:
        self.delays.append(delay)
        return await asyncio.sleep(min(delay, 1.0), result)


@pytest.fixture()
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    spy = SleepSpy()
    monkeypatch.setattr(llm_module, "asyncio", spy)
    return spy.delays


@pytest.fixture()
def stub() -> Iterator[tuple[Stub, str]]:
    server = Stub()
    with background_server(server.app) as url:
        yield server, url


def judge_for(url: str, **kw: Any) -> OpenAIJudge:
    kw.setdefault("backoff", 0.001)
    return OpenAIJudge("stub-model", base_url=url, **kw)


def test_request_shape_and_bearer_key(stub: tuple[Stub, str]) -> None:
    server, url = stub
    trait = load_trait("evil")
    results = judge_for(url, api_key=KEY).trait_scores(trait, ITEMS[:1])
    assert results[0].score == pytest.approx(GOOD_SCORE) and results[0].error is None
    req = server.requests[0]
    assert req["headers"]["authorization"] == f"Bearer {KEY}"
    body = req["body"]
    assert body["model"] == "stub-model"
    assert body["messages"] == [{"role": "user", "content": trait.rubric_prompt(*ITEMS[0].__dict__.values())}]
    assert (body["max_tokens"], body["temperature"], body["logprobs"], body["top_logprobs"]) == (1, 0, True, 20)
    coherence = judge_for(url, api_key=KEY).coherence_scores(ITEMS[:1])
    assert coherence[0].score == pytest.approx(GOOD_SCORE)
    assert server.requests[1]["body"]["messages"][0]["content"] == COHERENCE_RUBRIC.format(
        question=ITEMS[0].question, answer=ITEMS[0].answer
    )


def test_no_key_means_no_authorization_header(stub: tuple[Stub, str], monkeypatch: pytest.MonkeyPatch) -> None:
    server, url = stub
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    judge_for(url).score_prompts(["hello"])
    assert "authorization" not in server.requests[0]["headers"]


def test_base_url_and_key_come_from_the_environment_when_used(
    stub: tuple[Stub, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, url = stub
    monkeypatch.setenv("OPENAI_BASE_URL", url + "/")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    judge = OpenAIJudge("stub-model")
    assert judge.client.base_url == url
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # set after construction: read when the request is sent
    assert judge.score_prompts(["hi"])[0].score == pytest.approx(GOOD_SCORE)
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(judge) and KEY not in repr(judge.client)


def test_retries_429_then_500_honouring_retry_after(stub: tuple[Stub, str], sleeps: list[float]) -> None:
    server, url = stub
    result = judge_for(url).score_prompts(["this is FLAKY"])[0]
    assert result.score == pytest.approx(GOOD_SCORE) and result.error is None
    assert server.counts["FLAKY"] == 3
    assert len(sleeps) == 2
    assert sleeps[0] == pytest.approx(0.3)  # the 429's Retry-After, not the ~1 ms backoff
    assert 0.001 <= sleeps[1] <= 0.003  # after the 500 (no Retry-After): backoff 0.001 * 2^1 * U(0.5, 1.5)


def test_retry_after_is_capped(stub: tuple[Stub, str], sleeps: list[float]) -> None:
    server, url = stub
    result = judge_for(url, max_delay=0.05).score_prompts(["HUGEWAIT please"])[0]
    assert result.score == pytest.approx(GOOD_SCORE)
    assert server.counts["HUGEWAIT"] == 2
    assert sleeps == [pytest.approx(0.05)]  # Retry-After: 3600, capped at max_delay


def test_backoff_grows_exponentially(stub: tuple[Stub, str], sleeps: list[float]) -> None:
    server, url = stub
    result = judge_for(url, backoff=0.04, max_retries=3, api_key=KEY).score_prompts(["DOWN again"])[0]
    assert result.score is None and result.error is not None
    assert "4 attempts" in result.error and "503" in result.error
    assert KEY not in result.error
    assert server.counts["DOWN"] == 4 and len(sleeps) == 3
    # waits are backoff * 2^attempt * U(0.5, 1.5): 0.02-0.06, 0.04-0.12, 0.08-0.24 s
    for attempt, delay in enumerate(sleeps):
        assert 0.04 * 2**attempt * 0.5 <= delay <= 0.04 * 2**attempt * 1.5
    assert sleeps[0] < sleeps[2]


def test_permanent_failure_is_recorded_per_item(stub: tuple[Stub, str]) -> None:
    server, url = stub
    results = judge_for(url).score_prompts(["one", "this is BAD", "three", "NOLOGPROBS here", "WORDS here"])
    assert [r.score for r in results[:1] + results[2:3]] == [pytest.approx(GOOD_SCORE)] * 2
    assert results[1].score is None and results[1].error is not None
    assert "400" in results[1].error and "Invalid parameter: messages" in results[1].error
    assert server.counts["BAD"] == 1  # not retried
    assert results[3].score is None and "logprobs" in (results[3].error or "")
    assert results[4].score is None and results[4].error is None  # mass 0.1 < 0.25: no score, no error


def test_concurrency_limit_is_honoured(stub: tuple[Stub, str]) -> None:
    server, url = stub
    assert server.gate == 3
    # the server holds GATE requests until three are in flight at once: they can only pass if the client sends
    # three concurrently, and the counter shows it never sends a fourth alongside
    results = judge_for(url, concurrency=3).score_prompts([f"GATE {i}" for i in range(12)])
    assert not server.guard_expired, "three requests were never in flight at once"
    assert all(r.score == pytest.approx(GOOD_SCORE) for r in results)
    assert server.counts["GATE"] == 12 and server.max_in_flight == 3


def test_timeouts_and_connection_errors_are_retried(stub: tuple[Stub, str]) -> None:
    server, url = stub
    # the first HANG request is answered only after the second arrives: the client must time out to get an answer
    result = judge_for(url, timeout=1.0, max_retries=2).score_prompts(["HANG on"])[0]
    assert not server.guard_expired, "the client never gave up on the hanging request"
    assert result.score == pytest.approx(GOOD_SCORE) and result.error is None
    assert server.counts["HANG"] == 2 and server.hang_retried.is_set()
    with background_server(FastAPI()) as gone:
        pass  # the port is free again: nothing listens there
    failed = judge_for(gone, max_retries=2, timeout=5.0).score_prompts(["x"])[0]
    assert failed.score is None and "3 attempts" in (failed.error or "") and "Connect" in (failed.error or "")


def test_the_key_never_appears_in_errors_or_logs(stub: tuple[Stub, str], caplog: pytest.LogCaptureFixture) -> None:
    _, url = stub
    caplog.set_level(logging.DEBUG)
    results = judge_for(url, api_key=KEY).score_prompts(["LEAKY one", "LEAKYRETRY two"])
    assert results[0].score is None and results[0].error is not None and "401" in results[0].error
    assert "Incorrect API key provided" in results[0].error and KEY not in results[0].error
    assert results[1].score == pytest.approx(GOOD_SCORE)
    assert "retrying" in caplog.text and KEY not in caplog.text
    with pytest.raises(JudgeRequestError) as info:
        run_many([OpenAIChatClient("m", base_url=url, api_key=KEY).chat([{"role": "user", "content": "LEAKY"}])])
    assert info.value.status == 401 and KEY not in str(info.value)


def test_run_many_works_inside_a_running_event_loop(stub: tuple[Stub, str]) -> None:
    _, url = stub
    judge = judge_for(url)

    async def inside() -> list[float | None]:
        return [r.score for r in judge.score_prompts(["a", "b"])]

    assert asyncio.run(inside()) == [pytest.approx(GOOD_SCORE)] * 2
    assert run_many([asyncio.sleep(0, result=i) for i in range(3)]) == [0, 1, 2]


def test_cache_scope_tracks_the_rubric(tmp_path: Path) -> None:
    judge = OpenAIJudge("m", base_url="http://127.0.0.1:9/v1")
    evil, humor = load_trait("evil"), load_trait("humorous")
    assert judge.id == "openai:m"
    assert judge.cache_scope(evil) != judge.cache_scope(humor)
    assert judge.cache_scope(evil) == judge.cache_scope(load_trait("evil"))
    assert judge.cache_scope(None).startswith("coherence")
    data = evil.to_dict()
    data["rubric"] = data["rubric"] + "\nBe strict."
    (tmp_path / "evil2.json").write_text(json.dumps(data))
    assert judge.cache_scope(load_trait(tmp_path / "evil2.json")) != judge.cache_scope(evil)


def test_duplicate_tokens_are_merged() -> None:
    response = _payload({"5": math.log(0.2)})
    response["choices"][0]["logprobs"]["content"][0]["top_logprobs"].append(
        {"token": "5", "logprob": math.log(0.2), "bytes": [53]}
    )
    assert top_logprobs_of(response)["5"] == pytest.approx(math.log(0.4))
