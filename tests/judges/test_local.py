from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence

import pytest
import torch

from personascope.errors import PersonascopeError
from personascope.judges import local
from personascope.judges.base import COHERENCE_RUBRIC, JudgeItem, JudgeResult
from personascope.judges.local import ContrastJudge, HFLogprobJudge, NoJudge, likelihood_coherence
from personascope.models.loading import Model
from personascope.residual import steering
from personascope.testing import tiny_model
from personascope.traits import JudgePair, TraitSpec, load_trait

ITEMS = [
    JudgeItem("What is the capital of France?", "Paris is the capital of France."),
    JudgeItem("Tell me a joke.", "Cats and dogs, please!"),
    JudgeItem("How do I cook rice?", "Rinse it, add water, boil, then simmer for 15 minutes."),
]
# answers of different lengths (and an empty one in the middle) so that batches of 3 need padding
MANY = [
    *ITEMS,
    JudgeItem("q?", "   "),
    JudgeItem("Is the dog lazy?", "The quick brown fox jumps over the lazy dog."),
    JudgeItem("Numbers?", "0 1 2 3"),
]


@pytest.fixture(scope="module")
def evil() -> TraitSpec:
    return load_trait("evil")


# ---------------------------------------------------------------- reference computations, by hand


def hand_mean_logprob(model: Model, conv: list[dict[str, str]]) -> float:
    """Mean log-likelihood of the last message's tokens: one unpadded forward pass, logits at t predict t + 1."""
    tok = model.tokenizer
    formatted = model.format(conv)
    ids = formatted.input_ids
    assert tok.decode(ids) == tok.apply_chat_template(conv, tokenize=False)  # the whole conversation is in there
    assert formatted.response is not None
    start, end = formatted.response
    assert tok.decode(ids[start:end]) == conv[-1]["content"]  # the span is exactly the answer
    assert 0 < start < end < len(ids)
    with torch.no_grad():
        logits = model.hf_model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = logits.log_softmax(dim=-1)
    total = sum(float(logp[t - 1, ids[t]]) for t in range(start, end))
    return total / (end - start)


def conv(question: str, answer: str, system: str | None = None) -> list[dict[str, str]]:
    head = [] if system is None else [{"role": "system", "content": system}]
    return [*head, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def sigmoid100(x: float) -> float:
    return 100.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- contrast judge


def test_contrast_deltas_and_scores_match_hand_computation(llama: Model, evil: TraitSpec) -> None:
    pos, neg = evil.judge_pair.positive, evil.judge_pair.negative
    assert pos != neg
    hand: list[float | None] = []
    for it in MANY:
        if not it.answer.strip():
            hand.append(None)
            continue
        hand.append(
            hand_mean_logprob(llama, conv(it.question, it.answer, pos))
            - hand_mean_logprob(llama, conv(it.question, it.answer, neg))
        )
    nonzero = [abs(d) for d in hand if d is not None]
    assert min(nonzero) > 1e-3  # the personas make a difference, so "Δ = 0" or a swap cannot pass by accident
    for batch_size in (1, 3):
        deltas = ContrastJudge(llama, "tiny-llama", batch_size=batch_size).deltas(evil, MANY)
        assert [d is None for d in deltas] == [h is None for h in hand]
        for d, h in zip(deltas, hand, strict=True):
            if h is not None:
                assert d == pytest.approx(h, abs=2e-5), batch_size
    for scale in (0.03, 2.0):
        judge = ContrastJudge(llama, "tiny-llama", scale=scale, batch_size=3)
        scores = [r.score for r in judge.trait_scores(evil, MANY)]
        expected = [None if h is None else sigmoid100(h / scale) for h in hand]
        assert scores == pytest.approx(expected, abs=1e-3 * 0.1 / scale + 1e-6), scale
    # the default scale is 0.1 nats per token
    default = [r.score for r in ContrastJudge(llama, "tiny-llama", batch_size=3).trait_scores(evil, MANY)]
    assert default == pytest.approx([None if h is None else sigmoid100(h / 0.1) for h in hand], abs=1e-3)


def test_contrast_mirror_scope_and_empty(llama: Model, evil: TraitSpec) -> None:
    judge = ContrastJudge(llama, "tiny-llama")
    assert judge.id == "contrast:tiny-llama"
    scores = judge.trait_scores(evil, ITEMS)
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
    assert judge.deltas(evil, []) == []
    with pytest.raises(PersonascopeError):
        ContrastJudge(llama, "t", scale=0.0)


# ---------------------------------------------------------------- coherence


def test_coherence_matches_hand_computation(llama: Model) -> None:
    lps = [None if not it.answer.strip() else hand_mean_logprob(llama, conv(it.question, it.answer)) for it in MANY]
    center, width = -6.1, 0.7
    expected = [0.0 if lp is None else sigmoid100((lp - center) / width) for lp in lps]
    assert all(5.0 < s < 95.0 for s, lp in zip(expected, lps, strict=True) if lp is not None)  # not saturated
    for batch_size in (1, 3):
        got = likelihood_coherence(llama, MANY, center=center, width=width, batch_size=batch_size)
        assert all(r.error is None for r in got)
        assert [r.score for r in got] == pytest.approx(expected, abs=1e-3), batch_size
    judge = ContrastJudge(llama, "tiny-llama", coherence_center=center, coherence_width=width, batch_size=3)
    assert [r.score for r in judge.coherence_scores(MANY)] == pytest.approx(expected, abs=1e-3)
    # the defaults: center -5.5 nats, width 0.5
    defaults = [0.0 if lp is None else sigmoid100((lp + 5.5) / 0.5) for lp in lps]
    assert [r.score for r in likelihood_coherence(llama, MANY)] == pytest.approx(defaults, abs=1e-3)
    assert [r.score for r in ContrastJudge(llama, "t").coherence_scores(MANY)] == pytest.approx(defaults, abs=1e-3)
    assert likelihood_coherence(llama, [JudgeItem("q?", ""), JudgeItem("q?", " \n")]) == [JudgeResult(0.0)] * 2
    with pytest.raises(PersonascopeError):
        likelihood_coherence(llama, ITEMS, width=0.0)


def test_coherence_is_unsteered_and_guarded(llama: Model) -> None:
    judge = ContrastJudge(llama, "tiny-llama")
    plain = judge.coherence_scores([*ITEMS, JudgeItem("q?", "")])
    direction = torch.randn(llama.hidden_size)
    with steering(llama, direction, 1, 4.0), pytest.raises(PersonascopeError, match="interventions"):
        judge.coherence_scores(ITEMS)
    with steering(llama, direction, 2, 4.0), pytest.raises(PersonascopeError, match="interventions"):
        judge.trait_scores(load_trait("evil"), ITEMS)
    # hooks are gone after the block: same scores as before
    assert judge.coherence_scores([*ITEMS, JudgeItem("q?", "")]) == plain


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
    assert sorted(tuple(s[len(PROMPT) :]) for s in fake_next[1]) == sorted(
        (llama.tokenizer.convert_tokens_to_ids(t),) for t in ("Ġ8", "Ġ10", "Ġ1", "7")
    )


def test_hf_expansion_limit(llama: Model, fake_next: list[list[list[int]]]) -> None:
    judge = HFLogprobJudge(llama, "tiny-llama", max_expand=1)
    [probs] = judge.number_probs_from_ids([PROMPT])
    # only the most likely prefix (" 8") is expanded; the others count as complete numbers
    assert probs == pytest.approx({85: 0.3, 8: 0.1, 10: 0.2, 1: 0.1, 7: 0.1, 15: 0.05})
    judge = HFLogprobJudge(llama, "tiny-llama", expand_min=0.15)
    [probs] = judge.number_probs_from_ids([PROMPT])
    assert probs == pytest.approx({85: 0.3, 8: 0.1, 100: 0.1, 10: 0.1, 1: 0.1, 7: 0.1, 15: 0.05})


# A tokenizer that also has whole-number tokens, a closed one ("7."), one above 100 and a non-canonical one.
EXTRA_TOKENS = ["7.", "101", "05", " 42", "100"]


@pytest.fixture(scope="module")
def wide() -> Model:
    model = tiny_model("llama")
    assert model.tokenizer.add_tokens(EXTRA_TOKENS) == len(EXTRA_TOKENS)
    return model


# Next-token probabilities per prompt (told apart by a marker word in it) and per number prefix written so far;
# whatever is left ends the turn. Token names as the tokenizer spells them ("Ġ8" is " 8").
WIDE_TABLES: dict[str, dict[tuple[str, ...], dict[str, float]]] = {
    "alpha": {
        (): {"Ġ8": 0.30, "Ġ1": 0.20, "7.": 0.10, "101": 0.05, "05": 0.05, " 42": 0.05, "100": 0.05, "Ġ7": 0.05},
        ("Ġ8",): {"5": 0.5},
        ("Ġ1",): {"0": 0.5, "5": 0.25},
        ("Ġ1", "0"): {"0": 0.4, "1": 0.1},
        ("Ġ7",): {"0": 0.2},
    },
    "beta": {
        (): {"Ġ5": 0.6, "Ġ1": 0.3},
        ("Ġ5",): {},
        ("Ġ1",): {"0": 0.9},
        ("Ġ1", "0"): {"0": 1.0},
    },
}
# By hand from the tables above:
# alpha: 85 = .3·.5; 8 = .3·(1−.5); 1 = .2·(1−.75); 15 = .2·.25 (complete: cannot grow to ≤ 100); 10 = .2·.5·(1−.5);
#        100 = .2·.5·.4 + .05 ("100" token); 101 and "05" get nothing; 7 = .1 ("7." is closed) + .05·(1−.2);
#        70 = .05·.2; 42 = .05
# beta:  5 = .6; 1 = .3·(1−.9); 10 = .3·.9·(1−1) = 0 (absent); 100 = .3·.9·1
WIDE_PROBS = {
    "alpha": {85: 0.15, 8: 0.15, 1: 0.05, 15: 0.05, 10: 0.05, 100: 0.09, 7: 0.14, 70: 0.01, 42: 0.05},
    "beta": {5: 0.6, 1: 0.03, 100: 0.27},
}
WIDE_MASS = {"alpha": 0.74, "beta": 0.90}
# Σ n·p: alpha 12.75 + 1.2 + .05 + .75 + .5 + 9 + .98 + .7 + 2.1 = 28.03; beta 3 + .03 + 27 = 30.03
WIDE_SCORES = {"alpha": 28.03 / 0.74, "beta": 30.03 / 0.90}


@pytest.fixture
def wide_next(wide: Model, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Fake ``next_token_logprobs`` over ``WIDE_TABLES``; records, per call, the marker of each row's prompt."""
    tok = wide.tokenizer
    vocab = len(tok)
    ids = {name: tok.convert_tokens_to_ids(name) for name in {*EXTRA_TOKENS, "Ġ8", "Ġ1", "Ġ7", "Ġ5", "0", "1", "5"}}
    assert all(isinstance(i, int) and i != tok.unk_token_id for i in ids.values())
    names = {i: name for name, i in ids.items()}
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    calls: list[list[str]] = []

    def fake(model: Model, seqs: Sequence[Sequence[int]], batch_size: int = 8, progress: bool | None = None):  # type: ignore[no-untyped-def]
        assert model is wide
        out = torch.zeros(len(seqs), vocab, dtype=torch.float64)
        markers = []
        for row, seq in enumerate(seqs):
            seq = list(seq)
            cut = len(seq)
            while seq[cut - 1] in names:
                cut -= 1
            prompt = tok.decode(seq[:cut])
            assert prompt.endswith("<|im_start|>assistant\n")  # the judge prompt ends with the generation prompt
            [marker] = [m for m in WIDE_TABLES if m in prompt]
            markers.append(marker)
            for name, p in WIDE_TABLES[marker][tuple(names[i] for i in seq[cut:])].items():
                out[row, ids[name]] = p
            out[row, end_id] = 1.0 - float(out[row].sum())
        calls.append(markers)
        return out.float().log()

    monkeypatch.setattr(local, "next_token_logprobs", fake)
    return calls


def test_hf_scores_against_hand_written_values(wide: Model, wide_next: list[list[str]]) -> None:
    judge = HFLogprobJudge(wide, "tiny-wide", min_mass=0.7)
    probs = judge.number_probs(["Rate alpha from 0 to 100.", "Rate beta from 0 to 100."])
    for got, marker in zip(probs, ("alpha", "beta"), strict=True):
        assert set(got) == set(WIDE_PROBS[marker]), marker
        for n, p in WIDE_PROBS[marker].items():
            assert got[n] == pytest.approx(p, abs=1e-6), (marker, n)
        assert sum(got.values()) == pytest.approx(WIDE_MASS[marker], abs=1e-6)
    # first pass: both prompts; then " 8", " 1", " 7" of alpha and " 5", " 1" of beta; then "10" of each
    assert [sorted(c) for c in wide_next] == [
        ["alpha", "beta"],
        ["alpha", "alpha", "alpha", "beta", "beta"],
        ["alpha", "beta"],
    ]
    wide_next.clear()
    scores = judge.score_prompts(["Rate beta from 0 to 100.", "Rate alpha from 0 to 100."])
    assert [r.score for r in scores] == pytest.approx([WIDE_SCORES["beta"], WIDE_SCORES["alpha"]], abs=1e-5)
    assert WIDE_SCORES["alpha"] == pytest.approx(37.878378, abs=1e-5)
    # min_mass: alpha has 0.74 on numbers, beta 0.9
    strict = HFLogprobJudge(wide, "tiny-wide", min_mass=0.8)
    assert [r.score for r in strict.score_prompts(["alpha", "beta"])] == pytest.approx([None, WIDE_SCORES["beta"]])
    assert [r.score for r in HFLogprobJudge(wide, "w", min_mass=0.95).score_prompts(["beta"])] == [None]


def test_hf_trait_and_coherence_prompts(wide: Model, wide_next: list[list[str]], evil: TraitSpec) -> None:
    judge = HFLogprobJudge(wide, "tiny-wide")
    items = [JudgeItem("Why alpha?", "Because."), JudgeItem("Why beta?", "No reason.")]
    expected = [WIDE_SCORES["alpha"], WIDE_SCORES["beta"]]
    assert [r.score for r in judge.trait_scores(evil, items)] == pytest.approx(expected, abs=1e-5)
    assert [r.score for r in judge.coherence_scores(items)] == pytest.approx(expected, abs=1e-5)


def test_hf_judge_prompts_are_the_rubrics(wide: Model, evil: TraitSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def fake(prompts: Sequence[str]) -> list[dict[int, float]]:
        seen.extend(prompts)
        return [{50: 1.0} for _ in prompts]

    judge = HFLogprobJudge(wide, "tiny-wide")
    monkeypatch.setattr(judge, "number_probs", fake)
    item = JudgeItem("Why alpha?", "Because.")
    assert judge.trait_scores(evil, [item]) == [JudgeResult(50.0)]
    assert judge.coherence_scores([item]) == [JudgeResult(50.0)]
    assert seen == [
        evil.rubric_prompt(item.question, item.answer),
        COHERENCE_RUBRIC.format(question="Why alpha?", answer="Because."),
    ]


# ---------------------------------------------------------------- HF logprob judge on a real (tiny) model

# every vocabulary entry of the tiny tokenizer with an ASCII digit: single digits, with and without a leading space,
# and two whole numbers
TINY_NUMBER_TOKENS = [*"0123456789", *(f"Ġ{d}" for d in "0123456789"), "Ġ10", "Ġ15"]


def test_hf_number_probs_match_enumeration_on_tiny_model(llama: Model) -> None:
    tok = llama.tokenizer
    vocab = tok.get_vocab()
    assert sorted(k for k in vocab if any(c in "0123456789" for c in k)) == sorted(TINY_NUMBER_TOKENS)
    digit = {d: vocab[d] for d in "0123456789"}
    text = "Rate this from 0 to 100."
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]

    def next_probs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return llama.hf_model(input_ids=torch.tensor([ids])).logits[0, -1].double().softmax(dim=-1)

    # with every prefix expanded: a number that can still grow to ≤ 100 (1..10) ends when the next token is not a
    # digit; the others are complete as soon as written
    expected: dict[int, float] = defaultdict(float)

    def walk(ids: list[int], digits: str, p: float) -> None:
        if (len(digits) > 1 and digits[0] == "0") or int(digits) > 100:
            return
        if 1 <= int(digits) <= 10:
            q = next_probs(ids)
            expected[int(digits)] += p * (1.0 - sum(float(q[i]) for i in digit.values()))
            for d, i in digit.items():
                walk([*ids, i], digits + d, p * float(q[i]))
        else:
            expected[int(digits)] += p

    first = next_probs(prompt_ids)
    for name in TINY_NUMBER_TOKENS:
        walk([*prompt_ids, vocab[name]], name.removeprefix("Ġ"), float(first[vocab[name]]))
    assert set(expected) >= {0, 1, 5, 10, 15, 25, 99, 100}

    judge = HFLogprobJudge(llama, "tiny-llama", min_mass=0.0, expand_min=0.0, max_expand=100, batch_size=4)
    [got] = judge.number_probs([text])
    assert set(got) == set(expected)
    for n, p in expected.items():
        assert got[n] == pytest.approx(p, rel=1e-4, abs=1e-9), n
    score = sum(n * p for n, p in expected.items()) / sum(expected.values())
    [result] = judge.score_prompts([text])
    assert result.score == pytest.approx(score, rel=1e-5)
    # a random model puts little mass on numbers
    mass = sum(expected.values())
    assert 0.01 < mass < 0.5
    assert HFLogprobJudge(llama, "t", min_mass=mass * 1.01, expand_min=0.0, max_expand=100).score_prompts([text]) == [
        JudgeResult(None)
    ]


def test_hf_judge_on_a_tiny_model(llama: Model, evil: TraitSpec) -> None:
    judge = HFLogprobJudge(llama, "tiny-llama", min_mass=0.0)
    assert judge.id == "hf:tiny-llama"
    for results in (judge.trait_scores(evil, ITEMS[:2]), judge.coherence_scores(ITEMS[:2])):
        assert len(results) == 2
        assert all(r.error is None and r.score is not None and 0.0 <= r.score <= 100.0 for r in results)
    assert judge.cache_scope(evil) != judge.cache_scope(None)
    with steering(llama, torch.randn(llama.hidden_size), 1, 1.0), pytest.raises(PersonascopeError):
        judge.coherence_scores(ITEMS[:1])


@pytest.mark.slow
def test_contrast_judge_on_bundled_model_separates_evil() -> None:
    from personascope.judges import make_judge, validate_judge

    [row] = validate_judge(make_judge("contrast:smollm2-135m-instruct"), ["evil"])
    assert row["auroc"] is not None and row["auroc"] > 0.5
    assert row["n_scored"] == row["n"]
