"""Linear probes from activations (or any features) to utilities, with the baselines that keep them honest.

A probe is standardisation followed by ridge regression (scikit-learn). The ridge penalty ``α`` is chosen on the
validation split (highest Pearson r), the probe is trained on the train split and scored on the test split:

- Pearson r between predicted and fitted utilities, with a percentile-bootstrap 95% interval;
- pairwise accuracy: for uniformly sampled pairs of test tasks, does the sign of the predicted difference match
  the sign of the utility difference;
- leave-one-topic-out r: every task is predicted by a probe (same ``α``) trained on all tasks of the *other*
  topics. This asks whether the probe reads a preference rather than a topic. Two summaries: ``loto_r``, r over
  all tasks pooled, and ``loto_within_r``, the mean over topics of r within the held-out topic. The pooled r also
  scores how well each topic's *level* is predicted, but it is biased downwards for features that know nothing
  about an unseen topic: their predictions for it fall back to roughly the mean utility of the other topics, which
  is anti-correlated with the held-out topic's own mean (a topic-only model scores clearly below 0, not 0). The
  within-topic r has no such bias but ignores differences between topics.

The same scoring runs on every layer and on baselines: any other feature matrix (sentence embeddings of the task
text, a one-hot topic code) and the probe trained on shuffled utilities (:func:`shuffled_control`: the mean over
several permutations, with the central 95% of the permutations' test r as its interval). The best layer is the one
with the highest validation r (chosen without looking at the test split).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from personascope.errors import PersonascopeError
from personascope.report.stats import pearson_ci

__all__ = [
    "DEFAULT_ALPHAS",
    "FeatureScore",
    "ProbeReport",
    "RidgeProbe",
    "evaluate_probes",
    "fit_ridge",
    "leave_one_topic_out",
    "one_hot",
    "pairwise_accuracy",
    "score_features",
    "select_ridge",
    "shuffled_control",
]

FloatArray = NDArray[np.float64]
DEFAULT_ALPHAS: tuple[float, ...] = (1e-1, 1.0, 1e1, 1e2, 1e3, 1e4, 1e5)


@dataclass
class RidgeProbe:
    """A fitted probe: ``predict(x) = ((x − mean) / scale) · coef + intercept``."""

    alpha: float
    mean: FloatArray
    scale: FloatArray
    coef: FloatArray
    intercept: float

    def predict(self, x: ArrayLike) -> FloatArray:
        arr = np.asarray(x, dtype=np.float64)
        return np.asarray(((arr - self.mean) / self.scale) @ self.coef + self.intercept, dtype=np.float64)

    @property
    def direction(self) -> FloatArray:
        """The weight vector in the original feature space (``predict`` is affine in ``x`` along it)."""
        return np.asarray(self.coef / self.scale, dtype=np.float64)


def fit_ridge(x: ArrayLike, y: ArrayLike, alpha: float) -> RidgeProbe:
    """Standardise ``x`` (train statistics) and fit ridge regression with penalty ``alpha``."""
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    scaler = StandardScaler().fit(xa)
    ridge = Ridge(alpha=float(alpha)).fit(scaler.transform(xa), ya)
    return RidgeProbe(
        alpha=float(alpha),
        mean=np.asarray(scaler.mean_, dtype=np.float64),
        scale=np.asarray(scaler.scale_, dtype=np.float64),
        coef=np.asarray(ridge.coef_, dtype=np.float64).reshape(-1),
        intercept=float(ridge.intercept_),
    )


def _flat(a: FloatArray) -> bool:
    """Constant up to rounding (a correlation with it is undefined)."""
    return bool(a.size < 2 or np.ptp(a) <= 1e-9 * max(1.0, float(np.abs(a).max())))


def _r(a: FloatArray, b: FloatArray) -> float:
    if _flat(a) or _flat(b):
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def select_ridge(
    x_train: ArrayLike, y_train: ArrayLike, x_val: ArrayLike, y_val: ArrayLike, alphas: Sequence[float]
) -> tuple[RidgeProbe, float]:
    """The probe (trained on train) whose ``α`` gives the highest validation Pearson r, and that r.

    Ties (and an undefined r) go to the larger ``α``, the simpler model.
    """
    if not alphas:
        raise PersonascopeError("give at least one ridge alpha")
    best: tuple[float, RidgeProbe] | None = None
    yv = np.asarray(y_val, dtype=np.float64)
    for alpha in sorted(float(a) for a in alphas):
        if not alpha > 0:
            raise PersonascopeError(f"ridge alphas must be positive, got {alpha}")
        probe = fit_ridge(x_train, y_train, alpha)
        r = _r(probe.predict(x_val), yv)
        score = -math.inf if math.isnan(r) else r
        if best is None or score >= best[0]:
            best = (score, probe)
    assert best is not None
    return best[1], best[0] if math.isfinite(best[0]) else math.nan


def pairwise_accuracy(pred: ArrayLike, true: ArrayLike, n_pairs: int = 2000, seed: int = 0) -> float:
    """Fraction of task pairs where ``sign(pred_i − pred_j) == sign(true_i − true_j)``.

    All pairs when there are at most ``n_pairs`` of them, else ``n_pairs`` pairs drawn uniformly; pairs tied in
    ``true`` are left out (``nan`` when none remain), and a tie in ``pred`` counts as half right.
    """
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    n = p.shape[0]
    if n < 2:
        return math.nan
    if n * (n - 1) // 2 <= n_pairs:
        i, j = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, n, size=n_pairs)
        j = (i + rng.integers(1, n, size=n_pairs)) % n
    dt = np.sign(t[i] - t[j])
    keep = dt != 0
    if not keep.any():
        return math.nan
    dp = np.sign(p[i] - p[j])[keep]
    return float(np.mean(np.where(dp == 0, 0.5, dp == dt[keep])))


def leave_one_topic_out(
    x: ArrayLike, y: ArrayLike, topics: Sequence[str], alpha: float
) -> tuple[float, dict[str, float]]:
    """Pooled r of leave-one-topic-out predictions, and the within-topic r of each topic (``nan`` if undefined).

    See the module docstring for why the pooled r is biased downwards for features without cross-topic information.
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    top = np.asarray(topics)
    names = sorted(set(top.tolist()))
    if len(names) < 2:
        return math.nan, {}
    pred = np.zeros_like(ya)
    within: dict[str, float] = {}
    for name in names:
        held = top == name
        probe = fit_ridge(xa[~held], ya[~held], alpha)
        pred[held] = probe.predict(xa[held])
        within[name] = _r(pred[held], ya[held])
    return _r(pred, ya), within


def one_hot(labels: Sequence[str]) -> FloatArray:
    """``[N, K]`` one-hot code of ``labels`` (columns in sorted label order)."""
    names = sorted(set(labels))
    out = np.zeros((len(labels), len(names)), dtype=np.float64)
    for i, label in enumerate(labels):
        out[i, names.index(label)] = 1.0
    return out


@dataclass
class FeatureScore:
    """How well one feature set (a layer, or a baseline) predicts utilities."""

    name: str
    layer: int | None
    alpha: float
    val_r: float
    test_r: float
    test_r_low: float
    test_r_high: float
    test_pair_acc: float
    loto_r: float
    loto_within_r: float
    n_train: int
    n_val: int
    n_test: int

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def _split_masks(splits: Sequence[str]) -> dict[str, NDArray[np.bool_]]:
    arr = np.asarray(splits)
    out = {s: arr == s for s in ("train", "val", "test")}
    unknown = sorted(set(arr.tolist()) - {"train", "val", "test"})
    if unknown:
        raise PersonascopeError(f"unknown split {unknown[0]!r}; every task needs split train, val or test")
    for name, min_n in (("train", 3), ("val", 3), ("test", 3)):
        if int(out[name].sum()) < min_n:
            raise PersonascopeError(
                f"the {name} split has {int(out[name].sum())} tasks; probes need at least {min_n} in each of "
                "train, val and test (use more tasks)"
            )
    return out


def score_features(
    x: ArrayLike,
    y: ArrayLike,
    splits: Sequence[str],
    topics: Sequence[str],
    *,
    name: str = "features",
    layer: int | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    n_pairs: int = 2000,
    seed: int = 0,
    loto: bool = True,
    shuffle: bool | int = False,
) -> tuple[FeatureScore, RidgeProbe]:
    """Score one feature matrix ``[N, D]`` against utilities ``[N]`` (see the module docstring).

    ``shuffle=True`` (or an integer, the permutation's seed) permutes the training utilities first (a chance
    baseline; ``α`` is still chosen on the true validation utilities, and no leave-one-topic-out score is computed).
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if xa.ndim != 2 or xa.shape[0] != ya.shape[0] or len(splits) != ya.shape[0] or len(topics) != ya.shape[0]:
        raise PersonascopeError(
            f"features {xa.shape}, utilities {ya.shape}, {len(splits)} splits and {len(topics)} topics do not match"
        )
    masks = _split_masks(splits)
    tr, va, te = masks["train"], masks["val"], masks["test"]
    y_train = ya[tr]
    if shuffle is not False:
        perm_seed = seed if shuffle is True else int(shuffle)
        y_train = np.random.default_rng(perm_seed).permutation(y_train)
    probe, val_r = select_ridge(xa[tr], y_train, xa[va], ya[va], alphas)
    pred = probe.predict(xa[te])
    if _flat(pred):
        r, low, high = math.nan, math.nan, math.nan
    else:
        r, low, high = pearson_ci(pred.tolist(), ya[te].tolist(), seed=seed)
    acc = pairwise_accuracy(pred, ya[te], n_pairs=n_pairs, seed=seed)
    loto_r = loto_within = math.nan
    if loto and shuffle is False:
        loto_r, within = leave_one_topic_out(xa, ya, topics, probe.alpha)
        defined = [v for v in within.values() if not math.isnan(v)]
        loto_within = float(np.mean(defined)) if defined else math.nan
    score = FeatureScore(
        name,
        layer,
        probe.alpha,
        val_r,
        r,
        low,
        high,
        acc,
        loto_r,
        loto_within,
        int(tr.sum()),
        int(va.sum()),
        int(te.sum()),
    )
    return score, probe


def shuffled_control(
    x: ArrayLike,
    y: ArrayLike,
    splits: Sequence[str],
    topics: Sequence[str],
    *,
    layer: int | None = None,
    n_shuffles: int = 10,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    n_pairs: int = 2000,
    seed: int = 0,
) -> FeatureScore:
    """The chance level of :func:`score_features`: probes trained on ``n_shuffles`` permutations of the training
    utilities. ``test_r`` / ``test_pair_acc`` / ``val_r`` / ``alpha`` are means over the permutations, and
    ``test_r_low`` / ``test_r_high`` the 2.5th and 97.5th percentiles of their test r (the null's spread)."""
    if n_shuffles < 1:
        raise PersonascopeError("n_shuffles must be at least 1")
    runs = [
        score_features(
            x,
            y,
            splits,
            topics,
            name="shuffled",
            layer=layer,
            alphas=alphas,
            n_pairs=n_pairs,
            seed=seed,
            shuffle=seed * 1000 + k,
        )[0]
        for k in range(n_shuffles)
    ]
    r = np.array([s.test_r for s in runs], dtype=np.float64)
    finite = r[np.isfinite(r)]

    def mean(values: list[float]) -> float:
        arr = np.array(values, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        return float(arr.mean()) if arr.size else math.nan

    first = runs[0]
    return FeatureScore(
        "shuffled",
        layer,
        mean([s.alpha for s in runs]),
        mean([s.val_r for s in runs]),
        mean(r.tolist()),
        float(np.percentile(finite, 2.5)) if finite.size else math.nan,
        float(np.percentile(finite, 97.5)) if finite.size else math.nan,
        mean([s.test_pair_acc for s in runs]),
        math.nan,
        math.nan,
        first.n_train,
        first.n_val,
        first.n_test,
    )


@dataclass
class ProbeReport:
    """Per-layer probe scores, the shuffled-label control per layer, baselines, and the probes' directions."""

    layers: list[FeatureScore]
    shuffled: list[FeatureScore]
    baselines: dict[str, FeatureScore]
    best_layer: int
    directions: FloatArray  # [len(layers), D]: each layer's probe weights in activation space
    probes: dict[int, RidgeProbe] = field(default_factory=dict)

    @property
    def best(self) -> FeatureScore:
        return next(s for s in self.layers if s.layer == self.best_layer)

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per score: the layers, their shuffled controls, then the baselines."""
        return [s.as_row() for s in self.layers + self.shuffled + list(self.baselines.values())]


def evaluate_probes(
    features: ArrayLike,
    utilities: ArrayLike,
    splits: Sequence[str],
    topics: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    baselines: Mapping[str, ArrayLike] | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    n_pairs: int = 2000,
    seed: int = 0,
    loto: bool = True,
    n_shuffles: int = 10,
) -> ProbeReport:
    """Probe every layer of ``features`` ``[N, L, D]`` for ``utilities`` ``[N]``, plus controls and baselines.

    ``layers`` names the L layers (default ``0..L-1``); ``baselines`` maps a name to another ``[N, D']`` feature
    matrix scored the same way (a ``"topic"`` one-hot baseline is always added); each layer also gets a
    :func:`shuffled_control` over ``n_shuffles`` permutations.
    """
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 3:
        raise PersonascopeError(f"features must be [tasks, layers, hidden], got shape {feats.shape}")
    names = list(range(feats.shape[1])) if layers is None else [int(x) for x in layers]
    if len(names) != feats.shape[1]:
        raise PersonascopeError(f"{len(names)} layer names for {feats.shape[1]} layers of features")
    kwargs: dict[str, Any] = dict(alphas=alphas, n_pairs=n_pairs, seed=seed)
    scores, shuffled, probes = [], [], {}
    for k, layer in enumerate(names):
        score, probe = score_features(
            feats[:, k], utilities, splits, topics, name="probe", layer=layer, loto=loto, **kwargs
        )
        scores.append(score)
        probes[layer] = probe
        shuffled.append(
            shuffled_control(feats[:, k], utilities, splits, topics, layer=layer, n_shuffles=n_shuffles, **kwargs)
        )
    base: dict[str, FeatureScore] = {}
    extra = dict(baselines or {})
    extra.setdefault("topic", one_hot(list(topics)))
    for name, x in extra.items():
        base[name] = score_features(x, utilities, splits, topics, name=name, loto=loto, **kwargs)[0]
    valid = [s for s in scores if not math.isnan(s.val_r)]
    best = max(valid, key=lambda s: s.val_r).layer if valid else names[len(names) // 2]
    assert best is not None
    directions = np.stack([probes[layer].direction for layer in names])
    return ProbeReport(scores, shuffled, base, int(best), directions, probes)
