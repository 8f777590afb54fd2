from __future__ import annotations

import pytest
import torch

from personascope.errors import PersonascopeError
from personascope.likelihood import mean_response_logprob, next_token_logprobs, response_logprobs
from personascope.models.loading import Model
from personascope.residual import steering
from tests.conftest import CONV, SHORT

LONG = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "How do I cook rice? Tell me the steps, please."},
    {"role": "assistant", "content": "Rinse it, add water, boil, then simmer for 15 minutes. The quick brown fox."},
]


def reference_response(model: Model, conv: list[dict[str, str]]) -> torch.Tensor:
    f = model.format(conv)
    assert f.response is not None
    start, end = f.response
    ids = torch.tensor([f.input_ids])
    with torch.no_grad():
        logp = model.hf_model(input_ids=ids).logits[0].float().log_softmax(-1)
    return logp[start - 1 : end - 1].gather(-1, ids[0, start:end, None]).squeeze(-1)


def reference_next(model: Model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.hf_model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)


def test_response_logprobs_match_plain_forward(llama: Model) -> None:
    convs = [CONV, SHORT, LONG]
    got = response_logprobs(llama, convs, batch_size=8)
    for conv, lp in zip(convs, got, strict=True):
        ref = reference_response(llama, conv)
        assert lp.shape == ref.shape and lp.dtype == torch.float32
        torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)


def test_padding_and_batch_size_invariance(llama: Model) -> None:
    convs = [SHORT, LONG, CONV, SHORT]
    alone = [response_logprobs(llama, [c], batch_size=1)[0] for c in convs]
    batched = response_logprobs(llama, convs, batch_size=3)
    for a, b in zip(alone, batched, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    means = mean_response_logprob(llama, convs, batch_size=2)
    torch.testing.assert_close(means, torch.stack([a.mean() for a in alone]), atol=1e-5, rtol=1e-5)


def test_next_token_logprobs_match_reference(llama: Model) -> None:
    prompts: list = [CONV[:2], SHORT[:1], [5, 6, 7, 8, 9, 10, 11, 12], LONG[:2]]
    got = next_token_logprobs(llama, prompts, batch_size=3)
    assert got.shape[0] == 4
    for prompt, row in zip(prompts, got, strict=True):
        ids = prompt if isinstance(prompt[0], int) else llama.formatter.prompt_ids(prompt)
        torch.testing.assert_close(row, reference_next(llama, ids), atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.exp().sum(-1), torch.ones(4), atol=1e-4)


def test_steering_applies_during_scoring(llama: Model) -> None:
    plain = response_logprobs(llama, [CONV])[0]
    direction = torch.randn(llama.hidden_size) * 3
    with steering(llama, direction, 1, 1.0, positions="response"):
        steered = response_logprobs(llama, [CONV])[0]
    assert not torch.allclose(plain, steered)
    # steering only response tokens leaves the first response token's log-probability unchanged
    torch.testing.assert_close(plain[0], steered[0])
    with steering(llama, direction, 1, 1.0, positions="prompt"):
        nxt = next_token_logprobs(llama, [CONV[:2]])
    assert not torch.allclose(nxt, next_token_logprobs(llama, [CONV[:2]]))


def test_errors(llama: Model) -> None:
    with pytest.raises(PersonascopeError, match="trailing assistant"):
        response_logprobs(llama, [CONV[:2]])
    with pytest.raises(PersonascopeError, match="assistant"):
        next_token_logprobs(llama, [CONV])
    assert response_logprobs(llama, []) == []
