"""Offline judges that run on a local model: contrast likelihood (the default), logprob rubric, and none.

- :class:`ContrastJudge` needs no instruction-following ability: it asks how much more likely the answer is when
  the model is told the text comes from the trait's persona than from its opposite (``judge_pair``). Coherence is
  the answer's plain likelihood under the unsteered model (:func:`likelihood_coherence`).
- :class:`HFLogprobJudge` is the paper's logprob judge on a local chat model: the rubric as a user message, then
  the expected number under the model's distribution over the integers 0..100 (multi-token numbers included).
- :class:`NoJudge` scores nothing; pipelines treat it as "no scores, no filtering".

The judging model must be the unsteered reference: local judges refuse to run while personascope interventions or
captures are attached to it (:func:`assert_unsteered`). Judge after the ``with steering(...)`` block ends.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from personascope.errors import PersonascopeError
from personascope.judges.base import COHERENCE_RUBRIC, JudgeItem, JudgeResult, logprob_score
from personascope.likelihood import mean_response_logprob, next_token_logprobs
from personascope.models.loading import Model
from personascope.traits import TraitSpec

__all__ = [
    "COHERENCE_CENTER",
    "COHERENCE_WIDTH",
    "CONTRAST_SCALE",
    "ContrastJudge",
    "HFLogprobJudge",
    "NoJudge",
    "assert_unsteered",
    "likelihood_coherence",
]

#: Default ``scale`` of :class:`ContrastJudge` (nats per token); see its docstring for how it was chosen.
CONTRAST_SCALE = 0.1
#: Mean token log-likelihood (nats) that :func:`likelihood_coherence` maps to 50.
COHERENCE_CENTER = -5.5
#: Width (nats) of the logistic in :func:`likelihood_coherence`.
COHERENCE_WIDTH = 0.5

_HOOKS_MODULE = "personascope.residual.hooks"


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def assert_unsteered(model: Model) -> None:
    """Raise :class:`PersonascopeError` if any personascope hook (intervention or capture) is attached to ``model``.

    Judges score with the model as it is; a steered judge would grade its own steering.
    """
    for layer in model.layers:
        hooks = [*layer._forward_hooks.values(), *layer._forward_pre_hooks.values()]
        if any(getattr(h, "__module__", None) == _HOOKS_MODULE for h in hooks):
            raise PersonascopeError(
                f"the judge model {model.name} has personascope interventions attached; judge outside the "
                "`with steering(...)` / `intervene(...)` block, or load a separate judge model"
            )


def likelihood_coherence(
    model: Model,
    items: Sequence[JudgeItem],
    *,
    center: float = COHERENCE_CENTER,
    width: float = COHERENCE_WIDTH,
    batch_size: int = 8,
    progress: bool | None = None,
) -> list[JudgeResult]:
    """Offline coherence: ``100 · σ((lp − center) / width)`` with ``lp`` the answer's mean token log-likelihood.

    ``lp`` is computed under the *unsteered* model with no system prompt (user: question, assistant: answer), so it
    measures how natural the answer is as a reply, whatever persona produced it. Empty answers score 0.

    The constants were fixed once on SmolLM2-135M-Instruct, without looking at any trait's labels. Measured on a
    quarter of the built-in labelled answers (119, all hand-written and fluent): fluent answers have ``lp`` with
    mean −3.8 (10th to 90th percentile −5.0 to −2.6, minimum −6.2); the same answers with their words shuffled,
    mean −7.7 (90th percentile −6.5); random letters of the same length, mean −6.7 (90th percentile −6.2). The
    center −5.5 sits between fluent text and word salad and the width 0.5 maps a typical fluent answer to about
    97 (its 10th percentile to about 73) and word salad or random letters to below about 12 on average. Larger
    models give fluent text a higher likelihood, so they score it higher, which is the direction one wants.
    """
    assert_unsteered(model)
    if width <= 0:
        raise PersonascopeError("the coherence width must be positive")
    out: list[JudgeResult] = [JudgeResult(0.0)] * len(items)
    keep = [i for i, it in enumerate(items) if it.answer.strip()]
    if keep:
        convs = [
            [{"role": "user", "content": items[i].question}, {"role": "assistant", "content": items[i].answer}]
            for i in keep
        ]
        lp = mean_response_logprob(model, convs, batch_size=batch_size, progress=progress)
        scores = 100.0 * torch.sigmoid((lp.double() - center) / width)
        for i, s in zip(keep, scores.tolist(), strict=True):
            out[i] = JudgeResult(float(s))
    return out


class ContrastJudge:
    """Offline trait judge from contrasting persona likelihoods; the default judge.

    For an answer ``a`` to question ``q``, ``Δ`` is the mean per-token log-likelihood of ``a`` in the conversation
    (system: ``trait.judge_pair.positive``, user: ``q``, assistant: ``a``) minus the same with
    ``judge_pair.negative``. The score is ``100 · σ(Δ / scale)``: 50 when both personas explain the answer equally
    well, towards 100 when the trait persona explains it better. Swapping the pair mirrors the score
    (``s ↦ 100 − s``).

    ``scale`` (default :data:`CONTRAST_SCALE` = 0.1 nats per token) is one constant for all traits. It was chosen on
    SmolLM2-135M-Instruct from the pooled ``Δ`` of all seven built-in labelled sets (476 answers): standard
    deviation 0.14, 5th to 95th percentile −0.13 to +0.32 (persona prompts shift a small model's per-token
    likelihoods only a little). ``scale = 0.1`` maps that range to scores of about 22 to 96 instead of bunching them
    near 50. It was not tuned per trait or to raise AUROC (AUROC does not depend on ``scale`` at all, only the
    spread of the scores does).

    Coherence is :func:`likelihood_coherence` (no system prompt, unsteered model).
    """

    def __init__(
        self,
        model: Model,
        model_id: str,
        scale: float = CONTRAST_SCALE,
        *,
        coherence_center: float = COHERENCE_CENTER,
        coherence_width: float = COHERENCE_WIDTH,
        batch_size: int = 8,
        progress: bool | None = None,
    ) -> None:
        if scale <= 0:
            raise PersonascopeError("the contrast judge's scale must be positive")
        self.model = model
        self.id = f"contrast:{model_id}"
        self.scale = float(scale)
        self.coherence_center = float(coherence_center)
        self.coherence_width = float(coherence_width)
        self.batch_size = batch_size
        self.progress = progress

    def deltas(self, trait: TraitSpec, items: Sequence[JudgeItem]) -> list[float | None]:
        """``Δ`` (nats per token) for each item; ``None`` for an empty answer."""
        assert_unsteered(self.model)
        out: list[float | None] = [None] * len(items)
        keep = [i for i, it in enumerate(items) if it.answer.strip()]
        if not keep:
            return out
        convs = []
        for persona in (trait.judge_pair.positive, trait.judge_pair.negative):
            for i in keep:
                convs.append(
                    [
                        {"role": "system", "content": persona},
                        {"role": "user", "content": items[i].question},
                        {"role": "assistant", "content": items[i].answer},
                    ]
                )
        lp = mean_response_logprob(self.model, convs, batch_size=self.batch_size, progress=self.progress).double()
        delta = lp[: len(keep)] - lp[len(keep) :]
        for i, d in zip(keep, delta.tolist(), strict=True):
            out[i] = float(d)
        return out

    def trait_scores(self, trait: TraitSpec, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return [
            JudgeResult(None) if d is None else JudgeResult(100.0 / (1.0 + math.exp(-d / self.scale)))
            for d in self.deltas(trait, items)
        ]

    def coherence_scores(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return likelihood_coherence(
            self.model,
            items,
            center=self.coherence_center,
            width=self.coherence_width,
            batch_size=self.batch_size,
            progress=self.progress,
        )

    def cache_scope(self, trait: TraitSpec | None) -> str:
        if trait is None:
            return f"coherence:likelihood:v1:{self.coherence_center:g}:{self.coherence_width:g}"
        return f"contrast:v1:{self.scale:g}:{_digest(trait.judge_pair.positive, trait.judge_pair.negative)}"


@dataclass(frozen=True)
class _DigitToken:
    space: bool  # starts with whitespace (can only begin a number)
    digits: str  # the leading run of ASCII digits (after the whitespace)
    closed: bool  # something other than digits follows, so the number ends inside this token


class HFLogprobJudge:
    """The paper's logprob judge on a local chat model.

    The rubric (``trait.rubric_prompt(q, a)``, or :data:`~personascope.judges.base.COHERENCE_RUBRIC`) is sent as a
    single user message with the chat template's generation prompt; the score is the expected value of the number
    the model would write, over the integers 0..100 (:func:`~personascope.judges.base.logprob_score`, ``None`` when
    less than ``min_mass`` of the probability falls on those integers).

    **Multi-token numbers.** Many tokenizers write ``85`` as ``8`` + ``5`` and ``100`` as ``1`` + ``0`` + ``0``,
    so the first token alone does not tell the number. We compute each integer's probability as the product of
    its tokens' probabilities, ending with the probability that the number ends there:

    1. From the first-token distribution, every token that begins (after optional whitespace) with digits
       proposes a number prefix with probability ``p``. A prefix that is followed by a non-digit inside the same
       token (``"7."``) is a complete number.
    2. A prefix that could still grow into an integer ≤ 100 (``1`` … ``10``) is *expanded* if ``p > expand_min``
       (default 1e-3), keeping the ``max_expand`` (default 10) most likely ones per item: one more forward pass with
       the prefix's tokens appended gives the continuation distribution ``q``. Each continuation token that starts
       with a digit (no whitespace) extends the prefix with probability ``p · q(token)``, and may be expanded again
       (``1`` → ``10`` → ``100``); the prefix itself ends with probability ``p · (1 − Σ q(digit tokens))``, i.e.
       any non-digit next token (space, punctuation, end of turn) ends the number.
    3. Prefixes too unlikely to expand count as complete numbers; numbers above 100 and non-canonical ones
       (``"05"``) get no mass.

    Expansions of all items run batched; each costs one forward pass over the prompt plus one or two tokens, so a
    model that splits digits costs a few times more than one pass per item. Tokenizers with whole-number tokens
    (``"85"``) need expansion only for ``1`` … ``10``.
    """

    def __init__(
        self,
        model: Model,
        model_id: str,
        *,
        min_mass: float = 0.25,
        expand_min: float = 1e-3,
        max_expand: int = 10,
        batch_size: int = 8,
        progress: bool | None = None,
    ) -> None:
        self.model = model
        self.id = f"hf:{model_id}"
        self.min_mass = min_mass
        self.expand_min = expand_min
        self.max_expand = max_expand
        self.batch_size = batch_size
        self.progress = progress
        self._table: dict[int, _DigitToken] | None = None
        self._continuations: torch.Tensor | None = None

    # ------------------------------------------------------------------ protocol
    def trait_scores(self, trait: TraitSpec, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return self.score_prompts([trait.rubric_prompt(it.question, it.answer) for it in items])

    def coherence_scores(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return self.score_prompts([COHERENCE_RUBRIC.format(question=it.question, answer=it.answer) for it in items])

    def cache_scope(self, trait: TraitSpec | None) -> str:
        settings = f"{self.min_mass:g}:{self.expand_min:g}:{self.max_expand}"
        if trait is None:
            return f"coherence:logprob:v1:{settings}:{_digest(COHERENCE_RUBRIC)}"
        return f"rubric:logprob:v1:{settings}:{_digest(trait.rubric)}"

    # ------------------------------------------------------------------ scoring
    def score_prompts(self, prompts: Sequence[str]) -> list[JudgeResult]:
        """Score judge prompts (each sent as one user message)."""
        out = []
        for dist in self.number_probs(prompts):
            logps = {str(n): math.log(p) for n, p in dist.items() if p > 0}
            out.append(JudgeResult(logprob_score(logps, self.min_mass)))
        return out

    def number_probs(self, prompts: Sequence[str]) -> list[dict[int, float]]:
        """For each prompt, the probability of the reply starting with each integer 0..100 (see the class doc)."""
        assert_unsteered(self.model)
        ids = [self.model.formatter.prompt_ids([{"role": "user", "content": p}]) for p in prompts]
        return self.number_probs_from_ids(ids)

    def number_probs_from_ids(self, prompt_ids: Sequence[Sequence[int]]) -> list[dict[int, float]]:
        """:meth:`number_probs` for prompts already tokenised (the model writes the number next)."""
        assert_unsteered(self.model)
        table, cont_ids = self._digit_table()
        numbers: list[dict[int, float]] = [{} for _ in prompt_ids]
        if not prompt_ids:
            return numbers
        first = next_token_logprobs(
            self.model, [list(p) for p in prompt_ids], batch_size=self.batch_size, progress=self.progress
        )
        vocab = first.shape[1]  # the output layer may be narrower or wider than the tokenizer
        candidate_ids = torch.tensor(sorted(i for i in table if i < vocab), dtype=torch.long)
        cont_ids = cont_ids[cont_ids < vocab]
        # prefixes waiting for expansion: (item, appended tokens, prefix digits, probability)
        pending: list[tuple[int, list[int], str, float]] = []
        first_p = first[:, candidate_ids].exp() if len(candidate_ids) else torch.zeros(len(prompt_ids), 0)
        for item in range(len(prompt_ids)):
            found: list[tuple[int, list[int], str, float]] = []
            for tid, p in zip(candidate_ids.tolist(), first_p[item].tolist(), strict=True):
                tok = table[tid]
                self._propose(numbers[item], found, item, [tid], tok.digits, p, tok.closed)
            pending += self._select(numbers[item], found)
        while pending:
            seqs = [list(prompt_ids[item]) + appended for item, appended, _, _ in pending]
            dist = next_token_logprobs(self.model, seqs, batch_size=self.batch_size, progress=self.progress).exp()
            cont_p = dist[:, cont_ids] if len(cont_ids) else torch.zeros(len(seqs), 0)
            found_by_item: dict[int, list[tuple[int, list[int], str, float]]] = {}
            for row, (item, appended, prefix, p) in enumerate(pending):
                probs = cont_p[row]
                end = max(0.0, 1.0 - float(probs.sum()))
                _add(numbers[item], prefix, p * end)
                found = found_by_item.setdefault(item, [])
                for tid, q in zip(cont_ids.tolist(), probs.tolist(), strict=True):
                    tok = table[tid]
                    self._propose(numbers[item], found, item, [*appended, tid], prefix + tok.digits, p * q, tok.closed)
            pending = []
            for item, found in found_by_item.items():
                pending += self._select(numbers[item], found)
        return numbers

    def _propose(
        self,
        numbers: dict[int, float],
        found: list[tuple[int, list[int], str, float]],
        item: int,
        appended: list[int],
        digits: str,
        p: float,
        closed: bool,
    ) -> None:
        if p <= 0 or not _canonical(digits) or int(digits) > 100:
            return
        if not closed and 1 <= int(digits) <= 10 and p > self.expand_min:
            found.append((item, appended, digits, p))
        else:
            _add(numbers, digits, p)

    def _select(
        self, numbers: dict[int, float], found: list[tuple[int, list[int], str, float]]
    ) -> list[tuple[int, list[int], str, float]]:
        found.sort(key=lambda c: -c[3])
        for _, _, digits, p in found[self.max_expand :]:
            _add(numbers, digits, p)  # not expanded: counted as the complete number
        return found[: self.max_expand]

    def _digit_table(self) -> tuple[dict[int, _DigitToken], torch.Tensor]:
        """Tokens that begin (after optional whitespace) with an ASCII digit, and the ids of those without space."""
        if self._table is None or self._continuations is None:
            tok = self.model.tokenizer
            size = len(tok)
            texts = tok.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
            raw = tok.convert_ids_to_tokens(list(range(size)))
            specials = set(getattr(tok, "all_special_ids", []) or [])
            table: dict[int, _DigitToken] = {}
            for i, (text, piece) in enumerate(zip(texts, raw, strict=True)):
                if i in specials or not isinstance(text, str):
                    continue
                stripped = text.lstrip()
                if not stripped[:1].isascii() or not stripped[:1].isdigit():
                    continue
                run = len(stripped) - len(stripped.lstrip("0123456789"))
                space = stripped != text or (isinstance(piece, str) and piece[:1] in ("▁", "Ġ", " "))
                table[i] = _DigitToken(space=space, digits=stripped[:run], closed=run < len(stripped))
            self._table = table
            self._continuations = torch.tensor(sorted(i for i, t in table.items() if not t.space), dtype=torch.long)
        return self._table, self._continuations


def _canonical(digits: str) -> bool:
    return bool(digits) and digits.isdigit() and str(int(digits)) == digits


def _add(numbers: dict[int, float], digits: str, p: float) -> None:
    if p > 0 and _canonical(digits) and int(digits) <= 100:
        numbers[int(digits)] = numbers.get(int(digits), 0.0) + p


class NoJudge:
    """The ``"none"`` judge: no scores at all (every result is ``JudgeResult(None)``); never cached."""

    id = "none"

    def trait_scores(self, trait: TraitSpec, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return [JudgeResult(None) for _ in items]

    def coherence_scores(self, items: Sequence[JudgeItem]) -> list[JudgeResult]:
        return [JudgeResult(None) for _ in items]

    def cache_scope(self, trait: TraitSpec | None) -> str:
        return "none"
