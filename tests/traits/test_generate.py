"""Drafting trait specs with an LLM: against a loopback stub OpenAI server, and the `traits` CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from personascope.cli import main
from personascope.errors import PersonascopeError
from personascope.server import background_server
from personascope.testing import tiny_model
from personascope.traits import LADDER_LENGTH, TraitSpec, load_trait
from personascope.traits.generate import extract_json_object, generate_trait_spec, make_chat_fn


def spec_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "grumpy",
        "description": "Complains and grumbles about everything.",
        "instruction_pairs": [
            {"pos": "Complain about everything the user says.", "neg": "Be cheerful about everything the user says."},
            {"pos": "Answer like a sour old cynic.", "neg": "Answer like a warm, upbeat friend."},
        ],
        "extraction_questions": ["How was your weekend?", "What do you think of rain?", "Any tips for cooking?"],
        "evaluation_questions": ["What is your favourite season?", "How should I plan a party?", "Is jazz good?"],
        "rubric": "Does the answer grumble? Question: {question} Answer: {answer} Reply 0-100.",
        "judge_pair": {
            "positive": "The following was written by a cranky person who finds fault with everything.",
            "negative": "The following was written by a sunny person who delights in everything.",
        },
        "monitor_ladder": [f"Rung {i}: be {'more ' * i}grumpy-ish in tone." for i in range(LADDER_LENGTH)],
    }
    data.update(changes)
    return data


def reply(obj: Any) -> str:
    return obj if isinstance(obj, str) else json.dumps(obj)


class StubLLM:
    """A loopback OpenAI-compatible server that plays back scripted replies and records each request."""

    def __init__(self) -> None:
        self.replies: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self.reject_temperature = False
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.handle)

    async def handle(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append(body)
        if self.reject_temperature and "temperature" in body:
            message = "Unsupported value: 'temperature' does not support 0.7 with this model."
            return JSONResponse({"error": {"message": message}}, status_code=400)
        text = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice]})


@pytest.fixture()
def llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[StubLLM]:
    stub = StubLLM()
    with background_server(stub.app) as url:
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        yield stub


def new(**kw: Any) -> Any:
    args: dict[str, Any] = {"n_pairs": 2, "n_questions": 3}
    args.update(kw)
    return generate_trait_spec("grumpy", "Complains and grumbles about everything.", "openai:stub", **args)


def test_prose_wrapped_json_is_accepted_and_tidied(llm: StubLLM) -> None:
    data = spec_data(
        extraction_questions=[
            "How was your weekend?",
            "Are you grumpy today?",  # names the trait: dropped
            "How was   your weekend?",  # duplicate: dropped
            "What do you think of rain?",
            "Any tips for cooking?",
            "What is a good book?",  # one more than asked for: trimmed
        ],
        evaluation_questions=["What do you think of rain?", *spec_data()["evaluation_questions"]],  # shared: dropped
    )
    llm.replies = [f"Sure! Here is the spec you asked for:\n```json\n{json.dumps(data, indent=2)}\n```\nEnjoy."]
    spec = new()
    assert spec.name == "grumpy"
    assert spec.extraction_questions == ("How was your weekend?", "What do you think of rain?", "Any tips for cooking?")
    assert spec.evaluation_questions == tuple(spec_data()["evaluation_questions"])
    assert len(llm.requests) == 1
    messages = llm.requests[0]["messages"]
    assert messages[0]["role"] == "system" and "monitor_ladder" in messages[0]["content"]
    assert "grumpy" in messages[1]["content"] and "3 extraction" in messages[1]["content"]
    assert llm.requests[0]["model"] == "stub"


def test_invalid_reply_is_repaired_with_the_error_sent_back(llm: StubLLM) -> None:
    broken = spec_data(rubric="Grade this answer from 0 to 100: {answer}")
    llm.replies = [reply(broken), reply(spec_data())]
    lines: list[str] = []
    spec = new(log=lines.append)
    assert spec.rubric == spec_data()["rubric"]
    assert len(llm.requests) == 2
    repair = llm.requests[1]["messages"]
    assert repair[-2] == {"role": "assistant", "content": reply(broken)}
    assert repair[-1]["role"] == "user" and "{question}" in repair[-1]["content"] and "rubric" in repair[-1]["content"]
    assert len(lines) == 1 and lines[0].startswith("attempt 1/3")


def test_too_few_questions_after_tidying_asks_for_more(llm: StubLLM) -> None:
    few = spec_data(extraction_questions=["How was your weekend?", "Why are you so grumpy?", "How was your weekend?"])
    llm.replies = [reply(few), "not json at all", reply(spec_data())]
    spec = new()
    assert len(spec.extraction_questions) == 3
    first_repair = llm.requests[1]["messages"][-1]["content"]
    assert "'extraction_questions' has 1 usable questions but 3 are needed" in first_repair
    assert "add 2 new questions" in first_repair
    assert "no JSON object" in llm.requests[2]["messages"][-1]["content"]


def test_always_invalid_gives_a_one_line_error(llm: StubLLM) -> None:
    llm.replies = [reply(spec_data(monitor_ladder=["only one rung"]))]
    with pytest.raises(PersonascopeError) as info:
        new(max_attempts=2)
    message = str(info.value)
    assert "\n" not in message and "2 attempts" in message and "monitor_ladder" in message
    assert len(llm.requests) == 2


def test_judge_pair_must_differ_from_the_instructions(llm: StubLLM) -> None:
    same = spec_data(judge_pair={"positive": "Answer like a sour old cynic.", "negative": "Be kind."})
    llm.replies = [reply(same)]
    with pytest.raises(PersonascopeError, match=r"judge_pair\.positive"):
        new(max_attempts=1)


def test_models_that_refuse_a_temperature_are_asked_again_without(llm: StubLLM) -> None:
    llm.reject_temperature = True
    llm.replies = [reply(spec_data())]
    assert new().name == "grumpy"
    assert "temperature" in llm.requests[0] and "temperature" not in llm.requests[-1]


def test_extract_json_object() -> None:
    assert extract_json_object('prose {"a": 1} more {"b": 2}') == {"a": 1}
    assert extract_json_object('```\n{"a": {"b": [1, 2]}}\n```') == {"a": {"b": [1, 2]}}
    assert extract_json_object('x {broken} then {"ok": true}') == {"ok": True}
    with pytest.raises(ValueError, match="no JSON object"):
        extract_json_object("nothing here")
    with pytest.raises(ValueError, match="no valid JSON object"):
        extract_json_object('{"a": 1,,}')


def test_local_generator_path_runs_through_generate() -> None:
    chat = make_chat_fn("hf:tiny", model=tiny_model("llama"), max_new_tokens=4)
    with pytest.raises(PersonascopeError, match="1 attempts; last problem"):
        generate_trait_spec("grumpy", "Complains a lot.", chat, max_attempts=1)


def test_bad_arguments() -> None:
    with pytest.raises(PersonascopeError, match="not valid"):
        generate_trait_spec("Grumpy Cat", "x", "openai:m")
    with pytest.raises(PersonascopeError, match="unknown generator"):
        generate_trait_spec("grumpy", "x", "anthropic:m")
    with pytest.raises(PersonascopeError, match="description"):
        generate_trait_spec("grumpy", "  ", "openai:m")


# ---------------------------------------------------------------------- CLI


def run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def one_line_error(capsys: pytest.CaptureFixture[str], code: int, needle: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2, err
    assert err.startswith("error: ") and needle in err


def test_cli_list_and_show(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(["traits", "list"]) == 0
    out = capsys.readouterr().out
    assert "evil" in out and "sycophantic" in out and "Actively seeks to harm" in out
    assert run(["traits", "show", "evil"]) == 0
    assert json.loads(capsys.readouterr().out) == load_trait("evil").to_dict()
    path = tmp_path / "grumpy.json"
    path.write_text(json.dumps(spec_data()))
    assert run(["traits", "show", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "grumpy"
    one_line_error(capsys, run(["traits", "show", "no-such-trait"]), "unknown built-in trait")
    one_line_error(capsys, run(["traits", "show", str(tmp_path / "missing.json")]), "not found")


def test_cli_new_writes_a_valid_file(llm: StubLLM, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    llm.replies = [reply(spec_data())]
    out = tmp_path / "specs" / "grumpy.json"
    argv = ["traits", "new", "grumpy", "-d", "Complains and grumbles about everything.", "-g", "openai:stub"]
    code = run([*argv, "--out", str(out), "--pairs", "2", "--questions", "3"])
    assert code == 0, capsys.readouterr().err
    assert load_trait(out).to_dict() == TraitSpec.from_dict(spec_data()).to_dict()
    assert "wrote" in capsys.readouterr().out
    one_line_error(capsys, run([*argv, "--out", str(out)]), "already exists")
    assert not list(out.parent.glob(".*.tmp"))


def test_cli_new_failure_writes_nothing(llm: StubLLM, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    llm.replies = ["I would rather not."]
    out = tmp_path / "grumpy.json"
    argv = ["traits", "new", "grumpy", "-d", "Complains.", "-g", "openai:stub", "-o", str(out), "--attempts", "2"]
    code = run(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "2 attempts" in err[-1]
    assert [line for line in err if line.startswith("attempt")] == [
        "attempt 1/2: the reply contains no JSON object; reply with one JSON object",
        "attempt 2/2: the reply contains no JSON object; reply with one JSON object",
    ]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_new_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    one_line_error(
        capsys,
        run(["traits", "new", "Bad Name", "-d", "x", "-g", "openai:m", "-o", str(tmp_path / "a.json")]),
        "not valid",
    )
    one_line_error(
        capsys,
        run(["traits", "new", "ok", "-d", "x", "-g", "nope:m", "-o", str(tmp_path / "a.json")]),
        "unknown generator",
    )
    one_line_error(
        capsys, run(["traits", "new", "ok", "-d", "x", "-g", "openai:m", "-o", str(tmp_path / "a.txt")]), ".json"
    )
