from __future__ import annotations

import math

import numpy as np
import pytest

from personascope.errors import PersonascopeError
from personascope.preferences.probes import (
    evaluate_probes,
    fit_ridge,
    leave_one_topic_out,
    one_hot,
    pairwise_accuracy,
    score_features,
    select_ridge,
    shuffled_control,
)

N, LAYERS, HIDDEN, PLANTED = 160, 4, 24, 2


def synthetic(seed: int = 0):  # type: ignore[no-untyped-def]
    """Activations where only layer PLANTED carries the utilities (along ``w``), plus splits and topics."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(N, LAYERS, HIDDEN)) * rng.uniform(0.5, 3.0, size=HIDDEN)  # unequal feature scales
    w = rng.normal(size=HIDDEN)
    y = feats[:, PLANTED] @ w
    y = (y - y.mean()) / y.std() + 0.1 * rng.normal(size=N)
    splits = np.array(["train"] * 110 + ["val"] * 25 + ["test"] * 25)[rng.permutation(N)].tolist()
    topics = [f"topic{i % 5}" for i in range(N)]
    return feats, y, splits, topics, w


def test_planted_direction_is_recovered() -> None:
    feats, y, splits, topics, w = synthetic()
    report = evaluate_probes(feats, y, splits, topics, layers=[10, 11, 12, 13], alphas=(0.01, 1.0, 100.0, 1e4))
    assert report.best_layer == 10 + PLANTED
    best = report.best
    assert best.test_r > 0.95 and best.test_r_low > 0.85 and best.test_r_high <= 1.0
    assert best.test_pair_acc > 0.9 and best.loto_r > 0.9 and best.loto_within_r > 0.9
    assert (best.n_train, best.n_val, best.n_test) == (110, 25, 25)
    for s in report.layers:
        if s.layer != 10 + PLANTED:
            assert abs(s.test_r) < 0.6 or math.isnan(s.test_r)
    shuffled = next(s for s in report.shuffled if s.layer == report.best_layer)
    assert abs(shuffled.test_r) < 0.4 and math.isnan(shuffled.loto_r)
    assert shuffled.test_r_low < 0.5 < best.test_r_low  # the probe is far outside the null
    direction = report.directions[PLANTED]
    cos = direction @ w / np.linalg.norm(direction) / np.linalg.norm(w)
    assert cos > 0.95
    assert report.directions.shape == (LAYERS, HIDDEN)
    assert set(report.baselines) == {"topic"}
    assert abs(report.baselines["topic"].test_r) < 0.6
    assert math.isnan(report.baselines["topic"].loto_within_r)  # constant within each held-out topic
    assert len(report.rows()) == 2 * LAYERS + 1
    # the best layer's test scores, recomputed: sklearn's standardised ridge at the chosen alpha, trained on train
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    split = np.array(splits)
    tr, te = split == "train", split == "test"
    x = feats[:, PLANTED]
    pred = make_pipeline(StandardScaler(), Ridge(alpha=best.alpha)).fit(x[tr], y[tr]).predict(x[te])
    assert best.test_r == pytest.approx(np.corrcoef(pred, y[te])[0, 1], abs=1e-9)
    i, j = np.triu_indices(int(te.sum()), k=1)  # 300 pairs: all of them are scored
    agree = np.sign(pred[i] - pred[j]) == np.sign(y[te][i] - y[te][j])
    assert best.test_pair_acc == pytest.approx(agree.mean())


def test_probe_predictions_match_sklearn() -> None:
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats, y, *_ = synthetic(1)
    x = feats[:, PLANTED]
    probe = fit_ridge(x[:100], y[:100], 3.0)
    reference = make_pipeline(StandardScaler(), Ridge(alpha=3.0)).fit(x[:100], y[:100])
    np.testing.assert_allclose(probe.predict(x[100:]), reference.predict(x[100:]), atol=1e-8)
    # the direction is the gradient of the prediction with respect to the raw features
    step = probe.predict(x[:1] + np.eye(HIDDEN)) - probe.predict(x[:1])
    np.testing.assert_allclose(step, probe.direction, atol=1e-8)


def test_alpha_is_chosen_on_validation() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 200))  # far more features than tasks, pure noise except one column
    y = x[:, 0] + 0.05 * rng.normal(size=40)
    probe, val_r = select_ridge(x[:25], y[:25], x[25:], y[25:], [1e-3, 1e5])
    assert probe.alpha in (1e-3, 1e5) and val_r == pytest.approx(np.corrcoef(probe.predict(x[25:]), y[25:])[0, 1])
    constant = np.ones((40, 3))
    probe, val_r = select_ridge(constant[:25], y[:25], constant[25:], y[25:], [0.1, 10.0])
    assert math.isnan(val_r) and probe.alpha == 10.0  # nothing to choose: the larger penalty
    with pytest.raises(PersonascopeError, match="alpha"):
        select_ridge(x, y, x, y, [])
    with pytest.raises(PersonascopeError, match="positive"):
        select_ridge(x, y, x, y, [0.0])


def test_shuffled_control_is_centred_on_chance() -> None:
    feats, y, splits, topics, _ = synthetic(4)
    null = shuffled_control(feats[:, PLANTED], y, splits, topics, layer=7, n_shuffles=20, alphas=(1.0, 100.0))
    assert null.name == "shuffled" and null.layer == 7 and math.isnan(null.loto_r)
    assert abs(null.test_r) < 0.25 and null.test_r_low < 0 < null.test_r_high
    assert 0.35 < null.test_pair_acc < 0.65
    one = shuffled_control(feats[:, PLANTED], y, splits, topics, n_shuffles=1, alphas=(1.0,))
    assert one.test_r == one.test_r_low == one.test_r_high
    with pytest.raises(PersonascopeError, match="n_shuffles"):
        shuffled_control(feats[:, 0], y, splits, topics, n_shuffles=0)


def test_pairwise_accuracy() -> None:
    true = np.array([0.0, 1.0, 2.0, 3.0])
    assert pairwise_accuracy(true * 2, true) == 1.0
    assert pairwise_accuracy(-true, true) == 0.0
    assert pairwise_accuracy(np.zeros(4), true) == 0.5  # ties in the prediction are half right
    assert math.isnan(pairwise_accuracy(true, np.ones(4)))
    rng = np.random.default_rng(0)
    big = rng.normal(size=500)
    assert pairwise_accuracy(big, big, n_pairs=300) == 1.0
    assert 0.4 < pairwise_accuracy(rng.normal(size=500), big, n_pairs=3000) < 0.6


def test_leave_one_topic_out_never_trains_on_the_held_topic() -> None:
    rng = np.random.default_rng(3)
    topics = ["a"] * 20 + ["b"] * 20 + ["c"] * 20
    x = rng.normal(size=(60, 5))
    y = x @ np.array([1.0, -1.0, 0.5, 0.0, 0.0])
    r, within = leave_one_topic_out(x, y, topics, 0.01)
    assert r > 0.99 and set(within) == {"a", "b", "c"}
    # utilities that are only a topic offset cannot be predicted across topics from topic identity
    offset = np.array([{"a": 0.0, "b": 1.0, "c": 2.0}[t] for t in topics])
    r_topic, _ = leave_one_topic_out(one_hot(topics), offset, topics, 1.0)
    assert not r_topic > 0.5
    assert math.isnan(leave_one_topic_out(x, y, ["a"] * 60, 1.0)[0])


def test_leave_one_topic_out_matches_sklearn_refits() -> None:
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats, y, _, topics, _ = synthetic(5)
    x = feats[:, PLANTED]
    r, within = leave_one_topic_out(x, y, topics, 3.0)
    held_out = np.zeros(N)
    top = np.array(topics)
    for name in sorted(set(topics)):
        held = top == name
        model = make_pipeline(StandardScaler(), Ridge(alpha=3.0)).fit(x[~held], y[~held])
        held_out[held] = model.predict(x[held])
        assert within[name] == pytest.approx(np.corrcoef(held_out[held], y[held])[0, 1], abs=1e-9)
    assert list(within) == [f"topic{i}" for i in range(5)]
    assert r == pytest.approx(np.corrcoef(held_out, y)[0, 1], abs=1e-9)
    # and evaluate_probes reports it (pooled and the mean within-topic r) at the alpha it chose
    report = evaluate_probes(feats, y, synthetic(5)[2], topics, layers=[0, 1, 2, 3], alphas=(3.0,), n_shuffles=1)
    assert report.layers[PLANTED].loto_r == pytest.approx(r, abs=1e-9)
    assert report.layers[PLANTED].loto_within_r == pytest.approx(np.mean(list(within.values())), abs=1e-9)


def test_constant_features_give_an_undefined_r() -> None:
    _, y, splits, topics, _ = synthetic()
    flat = np.full((N, 4), 0.1) + 1e-17 * np.arange(N)[:, None]  # constant up to rounding, like one repeated token
    score, _ = score_features(flat, y, splits, topics, alphas=(1.0,))
    assert math.isnan(score.test_r) and math.isnan(score.val_r) and score.test_pair_acc == 0.5


def test_one_hot() -> None:
    np.testing.assert_array_equal(one_hot(["b", "a", "b"]), [[0, 1], [1, 0], [0, 1]])


def test_score_features_checks_its_inputs() -> None:
    feats, y, splits, topics, _ = synthetic()
    with pytest.raises(PersonascopeError, match="do not match"):
        score_features(feats[:, 0], y[:-1], splits, topics)
    few = ["train"] * (N - 4) + ["val", "val", "test", "test"]
    with pytest.raises(PersonascopeError, match="val split has 2 tasks"):
        score_features(feats[:, 0], y, few, topics)
    with pytest.raises(PersonascopeError, match="unknown split"):
        score_features(feats[:, 0], y, ["dev"] * N, topics)
    with pytest.raises(PersonascopeError, match="tasks, layers, hidden"):
        evaluate_probes(feats[:, 0], y, splits, topics)
