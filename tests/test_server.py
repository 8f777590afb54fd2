"""The OpenAI-compatible server, over real HTTP on loopback (uvicorn in a background thread)."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import personascope as ps
from personascope.cli import main
from personascope.models.loading import Model
from personascope.residual import Steering
from personascope.server import background_server, create_app
from personascope.testing import tiny_model
from personascope.vectors import PersonaVector

HI = [{"role": "user", "content": "Tell me a joke about cats."}]


@pytest.fixture(scope="module")
def model() -> Model:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def steering(model: Model) -> Steering:
    torch.manual_seed(1)
    return Steering.from_vector(model, torch.randn(model.hidden_size) * 5, layer=1, coef=4.0)


@pytest.fixture(scope="module")
def plain(model: Model) -> Iterator[tuple[str, Any]]:
    app = create_app(model)
    with background_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def steered(model: Model, steering: Steering) -> Iterator[str]:
    with background_server(create_app(model, steering=steering, model_id="steered")) as url:
        yield url


def chat(url: str, **body: Any) -> httpx.Response:
    body.setdefault("messages", HI)
    return httpx.post(f"{url}/chat/completions", json=body, timeout=60)


def run_cli(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def content(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def test_models_endpoint(plain: tuple[str, Any]) -> None:
    url, _ = plain
    body = httpx.get(f"{url}/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny-llama"]
    assert body["data"][0]["object"] == "model" and isinstance(body["data"][0]["created"], int)
    assert httpx.get(f"{url}/models/tiny-llama").json()["id"] == "tiny-llama"
    missing = httpx.get(f"{url}/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_chat_completion_fields_match_generate(plain: tuple[str, Any], model: Model) -> None:
    url, _ = plain
    r = chat(url, model="tiny-llama", max_tokens=6, temperature=0)
    body = r.json()
    assert r.status_code == 200
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == "tiny-llama"
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["logprobs"] is None
    expected = ps.generate(model, [HI], max_new_tokens=6, temperature=0)[0]
    assert choice["message"]["content"] == expected.text
    assert choice["finish_reason"] == ("stop" if expected.finished else "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(expected.prompt_ids)
    assert usage["completion_tokens"] == len(expected.response_ids) <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # max_completion_tokens is the newer name; text parts are joined
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Tell me a joke "}, {"type": "text", "text": "about cats."}],
        }
    ]
    r2 = chat(url, messages=parts, max_completion_tokens=6, temperature=0)
    assert content(r2) == expected.text


def test_logprobs_shape(plain: tuple[str, Any]) -> None:
    url, _ = plain
    body = chat(url, max_tokens=5, temperature=0, logprobs=True, top_logprobs=4).json()
    entries = body["choices"][0]["logprobs"]["content"]
    assert 1 <= len(entries) <= body["usage"]["completion_tokens"]
    for entry in entries:
        assert isinstance(entry["token"], str) and entry["logprob"] <= 0
        assert all(isinstance(b, int) and 0 <= b < 256 for b in entry["bytes"])
        tops = entry["top_logprobs"]
        assert len(tops) == 4
        values = [t["logprob"] for t in tops]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        # greedy: the chosen token is the most likely one
        assert tops[0]["bytes"] == entry["bytes"] and tops[0]["logprob"] == pytest.approx(entry["logprob"])
    only_chosen = chat(url, max_tokens=3, temperature=0, logprobs=True).json()
    assert all(e["top_logprobs"] == [] for e in only_chosen["choices"][0]["logprobs"]["content"])


def test_greedy_is_deterministic_and_seeds_reproduce(plain: tuple[str, Any]) -> None:
    url, _ = plain
    assert content(chat(url, max_tokens=8, temperature=0, seed=1)) == content(chat(url, max_tokens=8, temperature=0))
    a = content(chat(url, max_tokens=10, temperature=1.0, seed=5))
    assert a == content(chat(url, max_tokens=10, temperature=1.0, seed=5))
    others = {content(chat(url, max_tokens=10, temperature=1.0, seed=s)) for s in (6, 7, 8)}
    assert others != {a}


def test_stop_strings(plain: tuple[str, Any]) -> None:
    url, _ = plain
    full = content(chat(url, max_tokens=12, temperature=0))
    assert len(full) >= 4
    needle = full[2:4]
    body = chat(url, max_tokens=12, temperature=0, stop=[needle]).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert needle not in choice["message"]["content"] and full.startswith(choice["message"]["content"])


def test_steering_changes_output_and_request_coef_overrides(
    plain: tuple[str, Any], steered: str, model: Model, steering: Steering
) -> None:
    url, _ = plain
    base = content(chat(url, max_tokens=8, temperature=0))
    r = chat(steered, max_tokens=8, temperature=0)
    assert content(r) != base
    assert r.json()["personascope"] == {"layer": 1, "coef": 4.0}
    direct = ps.generate(model, [HI], max_new_tokens=8, temperature=0, interventions=steering.interventions())[0]
    assert content(r) == direct.text
    off = chat(steered, max_tokens=8, temperature=0, personascope={"coef": 0.0})
    assert content(off) == base and off.json()["personascope"]["coef"] == 0.0
    card = httpx.get(f"{steered}/models").json()["data"][0]
    assert card["id"] == "steered" and card["personascope"]["steering"]["layer"] == 1
    refused = chat(url, personascope={"coef": 1.0})
    assert refused.status_code == 400 and "--vector" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ("{not json", None),
        ("[]", None),
        ('{"model": "tiny-llama"}', "messages"),
        ('{"messages": []}', "messages"),
        ('{"messages": "hi"}', "messages"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "messages"),
        ('{"messages": [{"role": "user"}]}', "messages.0.content"),
        ('{"messages": [{"role": "user", "content": 5}]}', "messages.0.content"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}', "messages"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', "messages"),
        ('{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}', "top_logprobs"),
        ('{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}', "top_logprobs"),
        ('{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n"),
        ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
        ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}', "max_tokens"),
        ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 999999}', "max_tokens"),
        ('{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', "temperature"),
        ('{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', "top_p"),
        ('{"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}', "logprobs"),
        ('{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}', "stop"),
        ('{"messages": [{"role": "user", "content": "hi"}], "stream": true}', "stream"),
        ('{"messages": [{"role": "user", "content": "hi"}], "personascope": {"layer": 2}}', "personascope.layer"),
        ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300}', "messages"),
    ],
)
def test_malformed_requests_get_openai_style_errors(plain: tuple[str, Any], raw: str, param: str | None) -> None:
    url, _ = plain
    r = httpx.post(f"{url}/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_unknown_model_and_route(plain: tuple[str, Any]) -> None:
    url, _ = plain
    r = chat(url, model="gpt-4o")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert "tiny-llama" in r.json()["error"]["message"]
    nowhere = httpx.get(f"{url}/nowhere")
    assert nowhere.status_code == 404 and "error" in nowhere.json()


def test_requests_are_serialised_and_the_loop_stays_responsive(
    plain: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from personascope import server

    url, app = plain
    lock: threading.Lock = app.state.generation_lock
    generating = threading.Event()  # set in the worker thread right before the generation job takes the lock
    real_run_in_threadpool = server.run_in_threadpool

    async def spy(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def job(*a: Any, **kw: Any) -> Any:
            generating.set()
            return func(*a, **kw)

        return await real_run_in_threadpool(job, *args, **kwargs)

    monkeypatch.setattr(server, "run_in_threadpool", spy)
    results: list[httpx.Response] = []
    with lock:  # as if another request were generating
        worker = threading.Thread(target=lambda: results.append(chat(url, max_tokens=3, temperature=0)))
        worker.start()
        assert generating.wait(30), "the request never reached the generation job"
        assert worker.is_alive() and not results  # it waits for the lock ...
        assert httpx.get(f"{url.removesuffix('/v1')}/health", timeout=5).json() == {"status": "ok"}  # ... not the loop
        assert worker.is_alive() and not results
    worker.join(30)
    assert not worker.is_alive(), "the request did not finish once the lock was free"
    assert results and results[0].status_code == 200


def test_serve_binds_loopback_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model: Model) -> None:
    import uvicorn

    from personascope import server

    assert inspect.signature(server.serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(background_server).parameters["host"].default == "127.0.0.1"
    hf: Any = model.hf_model
    hf.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    vec = PersonaVector.for_model(model, torch.randn(model.num_layers + 1, model.hidden_size), chosen_layer=2)
    vec.save(tmp_path / "v.safetensors")
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    assert run_cli(["serve", "-m", str(tmp_path / "m")]) == 0
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 8000
    assert calls[-1]["app"].state.steering is None
    assert (
        run_cli(["serve", "-m", str(tmp_path / "m"), "--vector", str(tmp_path / "v.safetensors"), "--coef", "3"]) == 0
    )
    steer = calls[-1]["app"].state.steering
    assert steer is not None and steer.layer == 2 and steer.coef == 3.0


def test_serve_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["serve", "--coef", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--vector" in err and "\n" not in err


def test_serve_steering_defaults_come_from_the_vector(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model: Model, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    hf: Any = model.hf_model
    hf.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    directions = torch.randn(model.num_layers + 1, model.hidden_size)
    chosen = PersonaVector.for_model(model, directions, chosen_layer=2, chosen_coef=1.5).save(
        tmp_path / "c.safetensors"
    )
    bare = PersonaVector.for_model(model, directions).save(tmp_path / "b.safetensors")
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    assert run_cli(["serve", "-m", str(tmp_path / "m"), "--vector", str(chosen)]) == 0
    steer = calls[-1]["app"].state.steering
    assert (steer.layers, steer.coefs) == ((2,), (1.5,)) and torch.equal(steer.directions[0], directions[2])
    assert "coef 1.5 at layer 2" in capsys.readouterr().err
    # no chosen coefficient and none given: refused before the model loads (nothing served, one line)
    n_calls = len(calls)
    assert run_cli(["serve", "-m", str(tmp_path / "nowhere"), "--vector", str(bare), "--layer", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no chosen coefficient; pass --coef" in err and "\n" not in err
    assert run_cli(["serve", "-m", str(tmp_path / "m"), "--vector", str(chosen), "--coef", "nan"]) == 2
    assert "finite" in capsys.readouterr().err
    assert len(calls) == n_calls


def test_steering_card_and_override_through_the_policy(model: Model) -> None:
    vec = PersonaVector.for_model(
        model, torch.randn(model.num_layers + 1, model.hidden_size) * 5, chosen_layer=1, chosen_coef=4.0
    )
    steering = Steering.from_vector(model, vec, positions="last_prompt_and_response")
    with background_server(create_app(model, steering=steering, model_id="s")) as url:
        card = httpx.get(f"{url}/models").json()["data"][0]
        assert card["personascope"]["steering"] == {"layer": 1, "coef": 4.0, "positions": "last_prompt_and_response"}
        r = chat(url, max_tokens=6, temperature=0)
        assert r.json()["personascope"] == {"layer": 1, "coef": 4.0}
        direct = ps.generate(model, [HI], max_new_tokens=6, temperature=0, interventions=steering.interventions())
        assert content(r) == direct[0].text
        for bad in ("NaN", "Infinity", "1e999"):
            raw = '{"messages": [{"role": "user", "content": "hi"}], "personascope": {"coef": ' + bad + "}}"
            resp = httpx.post(f"{url}/chat/completions", content=raw, headers={"content-type": "application/json"})
            assert resp.status_code == 400, (bad, resp.text)
