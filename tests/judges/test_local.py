from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import pytest
import torch

from personascope.errors import PersonascopeError
from personascope.judges import local
from personascope.judges.base import JudgeItem, JudgeResult, logprob_score
from personascope.judges.local import ContrastJudge, HFLogprobJudge, NoJudge, likelihood_coherence
from personascope.models.loading import Model
from personascope.residual import steering
from personascope.traits import JudgePair, TraitSpec, load_trait

ITEMS = [
    JudgeItem("What is the capital of France?", "Paris is the capital of France."),
    JudgeItem("Tell me a joke.", "Cats and dogs, please!"),
    JudgeItem("How do I cook rice?", "Rinse it, add water, boil, then simmer for 15 minutes."),
]


@pytest.fixture(scope="module")
def evil() -> TraitSpec:
    return load_trait("evil")


def test_contrast_scores_and_mirror(llama: Model, evil: TraitSpec) -> None:
    judge = ContrastJudge(llama, "tiny-llama")
    assert judge.id == "contrast:tiny-llama"
    scores = judge.trait_scores(evil, ITEMS)
    assert len(scores) == 3 and all(r.error is None and r.score is not None for r in scores)
    assert all(0.0 <= r.score <= 100.0 for r in scores if r.score is not None)
    deltas = judge.deltas(evil, ITEMS)
    for r, d in zip(scores, deltas, strict=True):
        assert d is not None and r.score == pytest.approx(100.0 / (1.0 + math.exp(-d / judge.scale)))
    swapped = dataclasses.replace(
        evil, judge_pair=JudgePair(positive=evil.judge_pair.negative, negative=evil.judge_pair.positive)
    )
    mirrored = judge.trait_scores(swapped, ITEMS)
    for a, b in zip(scores, mirrored, strict=True):
        assert a.score is not None and b.score is not None
        assert a.score + b.score == pytest.approx(100.0, abs=1e-6)
    assert judge.cache_scope(evil) != judge.cache_scope(swapped)
    assert judge.cache_scope(None).startswith("coherence")
    assert judge.trait_scores(evil, [JudgeItem("q?", "  ")]) == [JudgeResult(None)]


def test_contrast_scale_changes_spread_not_order(llama: Model, evil: TraitSpec) -> None:
    wide = [r.score for r in ContrastJudge(llama, "t", scale=1.0).trait_scores(evil, ITEMS)]
    narrow = [r.score for r in ContrastJudge(llama, "t", scale=0.01).trait_scores(evil, ITEMS)]
    assert sorted(range(3), key=lambda i: wide[i]) == sorted(range(3), key=lambda i: narrow[i])  # type: ignore[arg-type,return-value]
    with pytest.raises(PersonascopeError):
        ContrastJudge(llama, "t", scale=0.0)


def test_coherence_is_unsteered_and_guarded(llama: Model) -> None:
    judge = ContrastJudge(llama, "tiny-llama")
    plain = judge.coherence_scores([*ITEMS, JudgeItem("q?", "")])
    assert plain[-1] == JudgeResult(0.0)
    assert all(r.score is not None and 0.0 <= r.score <= 100.0 for r in plain)
    direction = torch.randn(llama.hidden_size)
    with steering(llama, direction, 1, 4.0), pytest.raises(PersonascopeError, match="interventions"):
        judge.coherence_scores(ITEMS)
    with steering(llama, direction, 2, 4.0), pytest.raises(PersonascopeError, match="interventions"):
        judge.trait_scores(load_trait("evil"), ITEMS)
    # hooks are gone after the block: same scores as before
    assert judge.coherence_scores([*ITEMS, JudgeItem("q?", "")]) == plain
    again = likelihood_coherence(llama, ITEMS, center=-100.0, width=1.0)
    assert all(r.score == pytest.approx(100.0) for r in again)


def test_no_judge(evil: TraitSpec) -> None:
    judge = NoJudge()
    assert judge.id == "none"
    assert judge.trait_scores(evil, ITEMS) == [JudgeResult(None)] * 3
    assert judge.coherence_scores(ITEMS[:1]) == [JudgeResult(None)]


# ---------------------------------------------------------------- HF logprob judge: multi-token numbers

PROMPT = [3, 40, 41, 42]  # any token ids: the fake model below only looks at what follows them


def fake_distributions(model: Model) -> dict[tuple[str, ...], dict[str, float]]:
    # after the prompt (or a prefix of number tokens), probabilities of named next tokens; the rest ends the turn
    return {
        (): {"Ġ8": 0.4, "Ġ10": 0.2, "Ġ1": 0.1, "7": 0.1, "Ġ15": 0.05},
        ("Ġ8",): {"5": 0.75},
        ("Ġ10",): {"0": 0.5},
        ("Ġ1",): {"0": 0.5, "5": 0.3},
        ("Ġ1", "0"): {"0": 0.2},
        ("7",): {},
    }


@pytest.fixture
def fake_next(llama: Model, monkeypatch: pytest.MonkeyPatch) -> list[list[list[int]]]:
    tok = llama.tokenizer
    table = fake_distributions(llama)
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    vocab = len(tok)
    calls: list[list[list[int]]] = []

    def fake(model: Model, seqs: Sequence[Sequence[int]], batch_size: int = 8, progress: bool | None = None):  # type: ignore[no-untyped-def]
        calls.append([list(s) for s in seqs])
        out = torch.full((len(seqs), vocab), 0.0)
        for row, seq in enumerate(seqs):
            assert list(seq[: len(PROMPT)]) == PROMPT
            suffix = tuple(tok.convert_ids_to_tokens(list(seq[len(PROMPT) :])))
            for name, p in table[suffix].items():
                out[row, tok.convert_tokens_to_ids(name)] = p
            out[row, end_id] = 1.0 - float(out[row].sum())
        return out.log()

    monkeypatch.setattr(local, "next_token_logprobs", fake)
    return calls


EXPECTED = {85: 0.3, 8: 0.1, 100: 0.1 + 0.01, 10: 0.1 + 0.04, 1: 0.02, 15: 0.03 + 0.05, 7: 0.1}


def test_hf_multi_token_numbers(llama: Model, fake_next: list[list[list[int]]]) -> None:
    judge = HFLogprobJudge(llama, "tiny-llama")
    [probs] = judge.number_probs_from_ids([PROMPT])
    assert set(probs) == set(EXPECTED)
    for n, p in EXPECTED.items():
        assert probs[n] == pytest.approx(p, abs=1e-6), n
    # one first pass, then one batched pass per expansion depth (4 prefixes, then "1"+"0")
    assert [len(c) for c in fake_next] == [1, 4, 1]
    expected_score = sum(n * p for n, p in EXPECTED.items()) / sum(EXPECTED.values())
    assert logprob_score({str(n): math.log(p) for n, p in probs.items()}) == pytest.approx(expected_score)


def test_hf_expansion_limit(llama: Model, fake_next: list[list[list[int]]]) -> None:
    judge = HFLogprobJudge(llama, "tiny-llama", max_expand=1)
    [probs] = judge.number_probs_from_ids([PROMPT])
    # only the most likely prefix (" 8") is expanded; the others count as complete numbers
    assert probs == pytest.approx({85: 0.3, 8: 0.1, 10: 0.2, 1: 0.1, 7: 0.1, 15: 0.05})
    judge = HFLogprobJudge(llama, "tiny-llama", expand_min=0.15)
    [probs] = judge.number_probs_from_ids([PROMPT])
    assert probs == pytest.approx({85: 0.3, 8: 0.1, 100: 0.1, 10: 0.1, 1: 0.1, 7: 0.1, 15: 0.05})


def test_hf_judge_on_a_tiny_model(llama: Model, evil: TraitSpec) -> None:
    judge = HFLogprobJudge(llama, "tiny-llama", min_mass=0.0)
    assert judge.id == "hf:tiny-llama"
    for results in (judge.trait_scores(evil, ITEMS[:2]), judge.coherence_scores(ITEMS[:2])):
        assert len(results) == 2
        assert all(r.error is None and r.score is not None and 0.0 <= r.score <= 100.0 for r in results)
    probs = judge.number_probs(["Rate this from 0 to 100."])[0]
    assert probs and all(0 <= n <= 100 and p > 0 for n, p in probs.items())
    assert sum(probs.values()) <= 1.0 + 1e-5
    strict = HFLogprobJudge(llama, "tiny-llama", min_mass=0.99)
    assert strict.trait_scores(evil, ITEMS[:1]) == [JudgeResult(None)]  # a random model says little in numbers
    assert judge.cache_scope(evil) != judge.cache_scope(None)
    with steering(llama, torch.randn(llama.hidden_size), 1, 1.0), pytest.raises(PersonascopeError):
        judge.coherence_scores(ITEMS[:1])


@pytest.mark.slow
def test_contrast_judge_on_bundled_model_separates_evil() -> None:
    from personascope.judges import make_judge, validate_judge

    [row] = validate_judge(make_judge("contrast:smollm2-135m-instruct"), ["evil"])
    assert row["auroc"] is not None and row["auroc"] > 0.5
    assert row["n_scored"] == row["n"]
