"""The online CTR model, its snapshots, the single learner and the rankers' watcher."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from engine.features import FEATURE_NAMES
from engine.impressions import LabelledExample
from engine.store import BlobRead, MemoryStore, PutBlob
from models.online_ctr import MAX_SNAPSHOT_BYTES, PRIOR_WEIGHTS, LinearCTR, OnlineCTR
from models.online_learner import (
    SNAPSHOT_KEY,
    VERSION_KEY,
    OnlineLearner,
    SnapshotWatcher,
    latest_snapshot,
)

N = len(FEATURE_NAMES)
SHARE = FEATURE_NAMES.index("user_category_share")
ENGAGED = FEATURE_NAMES.index("user_engaged_item")
CONSTANT = FEATURE_NAMES.index("item_available")


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the chance a positive outscores a negative (ties count half)."""
    positives, negatives = scores[labels], scores[~labels]
    wins = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((wins + 0.5 * ties) / (len(positives) * len(negatives)))


def test_auc_helper() -> None:
    labels = np.array([True, False, True, False])
    assert auc(np.array([0.9, 0.1, 0.8, 0.2]), labels) == 1.0
    assert auc(np.array([0.1, 0.9, 0.2, 0.8]), labels) == 0.0
    assert auc(np.array([0.5, 0.5, 0.5, 0.5]), labels) == 0.5
    assert auc(np.array([0.9, 0.1, 0.3, 0.5]), labels) == 0.75


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clicks go to items *outside* the user's favourite category that they engaged with before:
    the hand-set prior believes the opposite about the category, so it must be learned."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, size=(n, N))
    x[:, ENGAGED] = rng.integers(0, 2, size=n)
    clicked = -6.0 * (x[:, SHARE] - 0.5) + 3.0 * (x[:, ENGAGED] - 0.5) > 0
    return x, clicked


OPTIMIZERS = ("ftrl", "sgd", "adam")


def as_dict(row: np.ndarray) -> dict[str, float]:
    return dict(zip(FEATURE_NAMES, row.tolist(), strict=True))


def one_by_one(model: OnlineCTR, x: np.ndarray) -> np.ndarray:
    return np.array([model.predict_proba(as_dict(row)) for row in x])


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_online_ctr_learns_a_separable_signal(optimizer: str, standardize: bool) -> None:
    train_x, train_y = synthetic(4000, seed=1)
    test_x, test_y = synthetic(1000, seed=2)
    assert auc(LinearCTR.prior().predict_proba_many(test_x), test_y) < 0.5  # the prior is wrong
    model = OnlineCTR(optimizer=optimizer, standardize=standardize)
    assert auc(model.snapshot(0).predict_proba_many(test_x), test_y) == 0.5  # zero weights
    model.learn_many(train_x, train_y)
    assert model.examples_seen == 4000
    snapshot = model.snapshot(version=1)
    assert auc(snapshot.predict_proba_many(test_x), test_y) > 0.9
    assert snapshot.weights[SHARE] < 0 < snapshot.weights[ENGAGED]


def test_online_ctr_rejects_an_unknown_optimizer() -> None:
    with pytest.raises(KeyError):
        OnlineCTR(optimizer="rmsprop")


def test_online_ctr_starts_from_zero_weights_not_the_prior() -> None:
    model = OnlineCTR()
    snapshot = model.snapshot(version=0)
    np.testing.assert_array_equal(snapshot.weights, np.zeros(N))
    assert snapshot.intercept == 0.0 and snapshot.examples_seen == 0
    assert not np.array_equal(snapshot.weights, LinearCTR.prior().weights)
    assert model.predict_proba(dict.fromkeys(FEATURE_NAMES, 3.0)) == 0.5
    assert not model.ready()
    # a snapshot without learner state (an old or hand-made one) is no place to resume from
    start = LinearCTR(5, np.linspace(-1, 1, N), intercept=0.25, examples_seen=777)
    fresh = OnlineCTR(start=start)
    assert fresh.examples_seen == 0 and not fresh.ready()
    np.testing.assert_array_equal(fresh.snapshot(6).weights, np.zeros(N))


def test_ready_flips_exactly_at_warmup_examples() -> None:
    assert OnlineCTR().warmup_examples == 500
    model = OnlineCTR(warmup_examples=7)
    x = dict.fromkeys(FEATURE_NAMES, 0.5)
    for n in range(7):
        assert not model.ready(), n
        model.learn(x, n % 2 == 0)
    assert model.examples_seen == 7 and model.ready()
    model.learn(x, True)
    assert model.ready()
    assert OnlineCTR(warmup_examples=0).ready()
    # a resumed model counts the examples it had seen before
    resumed = OnlineCTR(warmup_examples=9, start=model.snapshot(1))
    assert resumed.examples_seen == 8 and not resumed.ready()
    resumed.learn(x, False)
    assert resumed.ready()


def test_learn_moves_the_prediction_towards_the_label() -> None:
    model = OnlineCTR()
    x = dict.fromkeys(FEATURE_NAMES, 0.5)
    p = model.predict_proba(x)
    model.learn(x, False)
    assert model.predict_proba(x) < p
    after_skip = model.predict_proba(x)
    model.learn(x, True)
    assert model.predict_proba(x) > after_skip
    assert model.examples_seen == 2
    with pytest.raises(ValueError):
        model.learn_many(np.zeros((2, N)), [True])


def test_prior_weights() -> None:
    prior = LinearCTR.prior()
    assert prior.version == 0 and prior.examples_seen == 0
    assert prior.names == FEATURE_NAMES
    assert prior.learner_state is None
    for name, weight in zip(FEATURE_NAMES, prior.weights.tolist(), strict=True):
        assert weight == PRIOR_WEIGHTS.get(name, 0.0)
    assert prior.weights[SHARE] == 2.0


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_snapshot_scores_like_the_model_it_came_from(optimizer: str, standardize: bool) -> None:
    train_x, train_y = synthetic(500, seed=3)
    train_x[:, CONSTANT] = 1.0  # a feature that never varies while learning
    model = OnlineCTR(optimizer=optimizer, standardize=standardize)
    model.learn_many(train_x, train_y)
    snapshot = model.snapshot(version=2)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, N)) * 3  # the constant feature varies here
    many = snapshot.predict_proba_many(x)
    assert np.abs(many - one_by_one(model, x)).max() < 1e-9
    assert many.std() > 0.05  # not a degenerate model that scores everything alike
    if standardize:
        # the scaler maps a zero-variance feature to 0: folded, its weight is 0
        assert snapshot.weights[CONSTANT] == 0.0
        # and a model resumed from the snapshot (through its bytes) scores the same again
        blob = LinearCTR.from_bytes(snapshot.to_bytes())
        resumed = OnlineCTR(optimizer=optimizer, start=blob)
        assert np.abs(many - one_by_one(resumed, x)).max() < 1e-9


def test_snapshot_folds_the_scaler_into_plain_weights() -> None:
    rng = np.random.default_rng(7)
    train_x = rng.normal(loc=3.0, scale=2.0, size=(300, N))
    train_x[:, CONSTANT] = 4.0
    train_y = train_x[:, SHARE] > 3.0
    model = OnlineCTR()
    model.learn_many(train_x, train_y)
    snapshot = model.snapshot(version=1)
    state = snapshot.learner_state
    assert set(state) == {
        "scaled_weights",
        "scaled_intercept",
        "counts",
        "means",
        "vars",
        "optimizer",
    }
    assert state["counts"][FEATURE_NAMES[0]] == 300
    # the scaler's statistics are the sample mean and (population) variance
    np.testing.assert_allclose(
        [state["means"][name] for name in FEATURE_NAMES], train_x.mean(axis=0), rtol=1e-9
    )
    np.testing.assert_allclose(
        [state["vars"][name] for name in FEATURE_NAMES], train_x.var(axis=0), atol=1e-9
    )
    assert state["vars"][FEATURE_NAMES[CONSTANT]] == 0.0
    intercept = state["scaled_intercept"]
    for j, name in enumerate(FEATURE_NAMES):
        if j == CONSTANT:
            assert snapshot.weights[j] == 0.0
            continue
        std = math.sqrt(state["vars"][name])
        assert snapshot.weights[j] == pytest.approx(state["scaled_weights"][name] / std, rel=1e-12)
        intercept -= snapshot.weights[j] * state["means"][name]
    assert snapshot.intercept == pytest.approx(intercept, rel=1e-12, abs=1e-12)
    assert snapshot.weights[SHARE] > 0


def test_unstandardized_snapshot_is_the_raw_weights() -> None:
    train_x, train_y = synthetic(300, seed=8)
    model = OnlineCTR(standardize=False, optimizer="sgd")
    model.learn_many(train_x, train_y)
    snapshot = model.snapshot(version=1)
    assert snapshot.learner_state["counts"] == {}  # no scaler statistics without scaling
    x = np.zeros((1, N))
    x[0, SHARE] = 1.0
    zero = model.predict_proba(as_dict(np.zeros(N)))
    assert snapshot.predict_proba_many(np.zeros((1, N)))[0] == pytest.approx(zero, abs=1e-12)
    assert snapshot.contributions(x)[0, SHARE] == snapshot.weights[SHARE] < 0


def test_predict_proba_many_and_contributions() -> None:
    model = LinearCTR(1, np.arange(N, dtype=np.float64) / 10, intercept=-0.5)
    x = np.zeros((3, N))
    x[0, 1] = 2.0  # log-odds 0.2 - 0.5
    x[1, 5] = 1.0  # 0.5 - 0.5
    x[2, :] = -100.0  # far past the clip at -30
    p = model.predict_proba_many(x)
    assert p[0] == pytest.approx(1 / (1 + math.exp(0.3)))
    assert p[1] == pytest.approx(0.5)
    assert p[2] == pytest.approx(1 / (1 + math.exp(30.0)), rel=1e-9)
    c = model.contributions(x)
    assert c.shape == (3, N)
    assert c[0].tolist() == [0.0, 0.2, *[0.0] * (N - 2)]
    np.testing.assert_allclose(c.sum(axis=1) + model.intercept, x @ model.weights - 0.5)
    assert model.predict_proba_many(-x)[2] == pytest.approx(1 / (1 + math.exp(-30.0)), rel=1e-15)


# --- snapshots -------------------------------------------------------------------------------


def test_snapshot_bytes_round_trip() -> None:
    snapshot = LinearCTR(9, np.linspace(-2, 2, N), intercept=-1.25, examples_seen=123)
    back = LinearCTR.from_bytes(snapshot.to_bytes())
    assert (back.version, back.intercept, back.examples_seen) == (9, -1.25, 123)
    np.testing.assert_array_equal(back.weights, snapshot.weights)
    assert back.learner_state is None
    body = orjson.loads(snapshot.to_bytes())
    assert body["names"] == list(FEATURE_NAMES)


def test_snapshot_bytes_carry_the_learner_state() -> None:
    model = OnlineCTR()
    model.learn_many(*synthetic(50, seed=9))
    snapshot = model.snapshot(version=4)
    back = LinearCTR.from_bytes(snapshot.to_bytes())
    assert back.learner_state == snapshot.learner_state
    assert back.learner_state["counts"][FEATURE_NAMES[0]] == 50
    np.testing.assert_array_equal(back.weights, snapshot.weights)
    assert back.intercept == snapshot.intercept and back.examples_seen == 50
    assert len(snapshot.to_bytes()) < MAX_SNAPSHOT_BYTES


def _blob(**changes: object) -> bytes:
    body: dict[str, object] = {
        "version": 3,
        "names": list(FEATURE_NAMES),
        "weights": [0.1] * N,
        "intercept": 0.0,
        "examples_seen": 10,
    }
    body.update(changes)
    return orjson.dumps({k: v for k, v in body.items() if v is not None})


def test_from_bytes_maps_weights_by_name() -> None:
    blob = _blob(names=["user_category_share", "a_feature_from_the_future"], weights=[1.5, 9.0])
    snapshot = LinearCTR.from_bytes(blob)
    assert snapshot.weights[SHARE] == 1.5
    assert snapshot.weights.sum() == 1.5  # unknown names ignored, missing ones are 0
    assert LinearCTR.from_bytes(_blob(examples_seen=None)).examples_seen == 0


@pytest.mark.parametrize(
    "blob",
    [
        _blob().replace(b'"intercept":0.0', b'"intercept":NaN'),
        _blob().replace(b'"weights":[0.1', b'"weights":[Infinity'),
        _blob().replace(b'"weights":[0.1', b'"weights":[1e400'),
        _blob().replace(b'"weights":[0.1', b'"weights":[-1e999'),
        _blob(weights=[0.1] * (N - 1)),
        _blob(names=list(FEATURE_NAMES)[:-1]),
        _blob(weights=[None] + [0.1] * (N - 1)),
        _blob(weights=["x"] + [0.1] * (N - 1)),
        _blob(intercept="nan"),
        _blob(intercept="inf"),
        _blob(intercept=[1.0]),
        _blob().replace(b'"intercept":0.0,', b""),
        _blob().replace(b'"names":', b'"nomen":'),
        _blob(version="three"),
        _blob(learner_state=[1, 2]),
        _blob(learner_state="state"),
        b"[1, 2, 3]",
        b"",
        b"{",
    ],
)
def test_from_bytes_refuses_malformed_snapshots(blob: bytes) -> None:
    with pytest.raises(ValueError):
        LinearCTR.from_bytes(blob)


def test_from_bytes_refuses_oversized_snapshots() -> None:
    padding = " " * (MAX_SNAPSHOT_BYTES - len(_blob()) + 1)
    oversized = _blob()[:-1] + padding.encode() + b"}"
    assert len(oversized) == MAX_SNAPSHOT_BYTES + 1
    assert orjson.loads(oversized)  # well formed, only too large
    with pytest.raises(ValueError, match="too large"):
        LinearCTR.from_bytes(oversized)
    at_limit = oversized[:-2] + b"}"
    assert LinearCTR.from_bytes(at_limit).version == 3


# --- the learner and the watcher -------------------------------------------------------------


def example(clicked: bool, value: float = 0.5, request_id: str = "r-1") -> LabelledExample:
    return LabelledExample(request_id, "i-1", 1, clicked, (value,) * N, 0.0)


def test_learner_learns_each_source_once() -> None:
    store = MemoryStore()
    learner = OnlineLearner(store, publish_every_s=0.0)
    assert learner.version == 0
    assert learner.learn("e-1", [example(True), example(False)]) == 2
    assert learner.learn("e-1", [example(True), example(False)]) == 0
    assert learner.learn("e-2", [example(True)]) == 1
    assert learner.model.examples_seen == 3
    # an empty batch claims nothing: the source can still teach later
    assert learner.learn("e-3", []) == 0
    assert learner.learn("e-3", [example(True)]) == 1
    # the claim is in the store: another learner on it skips the source too
    assert OnlineLearner(store).learn("e-1", [example(True)]) == 0


def test_learner_publishes_only_when_due() -> None:
    store = MemoryStore()
    learner = OnlineLearner(store, publish_every_s=10.0, warmup_examples=1)
    assert learner.publish_if_due(now=100.0) is False  # nothing learned yet
    assert latest_snapshot(store) is None
    learner.learn("e-1", [example(True)])
    assert learner.publish_if_due(now=100.0) is True
    assert learner.version == 1
    assert store.read([BlobRead(VERSION_KEY)]) == [b"1"]
    assert latest_snapshot(store).examples_seen == 1
    learner.learn("e-2", [example(False)])
    assert learner.publish_if_due(now=109.9) is False
    assert learner.version == 1
    assert learner.publish_if_due(now=110.0) is True
    assert learner.version == 2
    assert learner.publish_if_due(now=1000.0) is False  # nothing new since
    published = latest_snapshot(store)
    assert published.version == 2 and published.examples_seen == 2
    np.testing.assert_array_equal(published.weights, learner.model.snapshot(2).weights)
    assert published.learner_state == learner.model.snapshot(2).learner_state


def test_learner_publishes_nothing_before_warmup() -> None:
    store = MemoryStore()
    learner = OnlineLearner(store, publish_every_s=0.0, warmup_examples=5)
    assert not learner.model.ready()
    assert learner.learn("e-1", [example(True), example(False)]) == 2
    assert learner.learn("e-2", [example(True), example(False)]) == 2
    assert learner.publish_if_due(now=100.0) is False  # 4 of 5 examples
    assert learner.version == 0 and latest_snapshot(store) is None
    assert SnapshotWatcher(store).poll() is None  # rankers keep serving the prior
    learner.learn("e-3", [example(True)])
    assert learner.model.ready()
    assert learner.publish_if_due(now=100.0) is True  # no need to learn more once ready
    assert latest_snapshot(store).examples_seen == 5


@pytest.mark.parametrize(
    "options",
    [{"optimizer": "sgd", "standardize": False}, {}, {"optimizer": "ftrl", "standardize": False}],
    ids=["sgd-raw", "default", "ftrl-raw"],
)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_examples_with_non_finite_features_are_never_learned(options: dict, bad: float) -> None:
    store = MemoryStore()
    learner = OnlineLearner(store, publish_every_s=0.0, warmup_examples=1, **options)
    learner.learn("e-1", [example(True)])
    assert learner.publish_if_due(now=1.0)
    assert learner.learn("bad", [example(True, value=bad), example(False, value=bad)]) == 0
    assert learner.learn("after", [example(True), example(False)]) == 2
    snapshot = learner.model.snapshot(2)
    assert np.isfinite(snapshot.weights).all() and math.isfinite(snapshot.intercept)
    assert learner.publish_if_due(now=2.0) is True
    assert latest_snapshot(store).version == 2


@pytest.mark.parametrize("part", ["weights", "intercept"])
def test_learner_never_publishes_a_non_finite_model(part: str) -> None:
    store = MemoryStore()
    learner = OnlineLearner(store, publish_every_s=0.0, warmup_examples=1, standardize=False)
    learner.learn("e-1", [example(True)])
    assert learner.publish_if_due(now=1.0)
    watcher = SnapshotWatcher(store)
    assert watcher.poll().version == 1
    learner.learn("e-2", [example(True)])
    regression = learner.model._regression
    if part == "weights":
        regression._weights[FEATURE_NAMES[0]] = math.nan
    else:
        regression.intercept = math.inf
    assert learner.publish_if_due(now=2.0) is False
    assert learner.version == 1
    assert latest_snapshot(store).version == 1
    assert watcher.poll() is None  # and the rankers keep the last good version


def test_watcher_follows_new_versions() -> None:
    store = MemoryStore()
    watcher = SnapshotWatcher(store)
    assert watcher.poll() is None and watcher.version is None
    learner = OnlineLearner(store, publish_every_s=0.0, warmup_examples=1)
    learner.learn("e-1", [example(True)])
    learner.publish_if_due(now=1.0)
    first = watcher.poll()
    assert first is not None and first.version == 1 and watcher.version == 1
    assert watcher.poll() is None
    learner.learn("e-2", [example(True, value=1.0)])
    learner.publish_if_due(now=2.0)
    second = watcher.poll()
    assert second.version == 2 and watcher.version == 2
    expected = learner.model.snapshot(2)
    np.testing.assert_array_equal(second.weights, expected.weights)
    assert second.intercept == expected.intercept
    assert second.examples_seen == 2
    assert watcher.poll() is None
    learner.learn("e-3", [example(False, value=0.2)])
    learner.publish_if_due(now=3.0)
    third = watcher.poll()
    assert third.version == 3 and third.examples_seen == 3
    assert not np.array_equal(third.weights, second.weights)
    assert watcher.poll() is None
    # a second watcher starts from whatever is published now
    assert SnapshotWatcher(store).poll().version == 3


def test_watcher_ignores_a_version_without_its_snapshot() -> None:
    store = MemoryStore()
    store.apply([PutBlob(VERSION_KEY, b"4")])
    watcher = SnapshotWatcher(store)
    assert watcher.poll() is None
    assert watcher.version is None
    store.apply([PutBlob(SNAPSHOT_KEY, LinearCTR(4, np.zeros(N), 0.0).to_bytes())])
    assert watcher.poll().version == 4


def _examples(x: np.ndarray, y: np.ndarray) -> list[LabelledExample]:
    return [
        LabelledExample("r", "i", 1, bool(label), tuple(row), 0.0)
        for row, label in zip(x.tolist(), y.tolist(), strict=True)
    ]


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "sgd"},
        {},
        {"optimizer": "adam"},
        {"optimizer": "sgd", "standardize": False},
        {"optimizer": "ftrl", "standardize": False},
    ],
    ids=["sgd", "ftrl-default", "adam", "sgd-raw", "ftrl-raw"],
)
def test_a_new_learner_resumes_exactly_where_the_published_one_stopped(options: dict) -> None:
    options = {"warmup_examples": 100, **options}
    store = MemoryStore()
    twin = OnlineLearner(store, publish_every_s=0.0, **options)  # never interrupted
    train_x, train_y = synthetic(600, seed=5)
    for n, example_ in enumerate(_examples(train_x[:300], train_y[:300])):
        twin.learn(f"e-{n}", [example_])
        if n % 100 == 99:
            twin.publish_if_due(now=float(n))
    assert twin.version == 3

    resumed = OnlineLearner(store, publish_every_s=0.0, **options)
    assert resumed.version == 3
    assert resumed.model.examples_seen == 300 and resumed.model.ready()
    probe_x = np.random.default_rng(6).uniform(-1.0, 2.0, size=(40, N))
    np.testing.assert_array_equal(
        one_by_one(resumed.model, probe_x), one_by_one(twin.model, probe_x)
    )
    assert resumed.learn("e-0", [example(True)]) == 0  # its sources stay learned

    # both go on learning the same examples: they stay the same model
    later = _examples(train_x[300:], train_y[300:])
    for n, example_ in enumerate(later):
        assert twin.learn(f"twin-{n}", [example_]) == 1
        assert resumed.learn(f"resumed-{n}", [example_]) == 1
    assert resumed.model.examples_seen == twin.model.examples_seen == 600
    np.testing.assert_allclose(
        one_by_one(resumed.model, probe_x), one_by_one(twin.model, probe_x), rtol=0, atol=1e-12
    )
    assert resumed.publish_if_due(now=1000.0) is True
    assert resumed.version == 4
    published = SnapshotWatcher(store).poll()
    assert published.version == 4
    uninterrupted = twin.model.snapshot(4)
    np.testing.assert_allclose(published.weights, uninterrupted.weights, rtol=0, atol=1e-10)
    assert published.intercept == pytest.approx(uninterrupted.intercept, abs=1e-10)


def test_online_model_learns_exactly_as_rivers_own_classes() -> None:
    # OnlineCTR's FTRL and scaler are faster copies of River's: the same weights, bit for bit.
    from river import linear_model, optim, preprocessing

    rng = np.random.default_rng(3)
    model = OnlineCTR(warmup_examples=1)
    scaler = preprocessing.StandardScaler()
    regression = linear_model.LogisticRegression(
        optimizer=optim.FTRLProximal(alpha=0.05, beta=1.0, l1=0.0, l2=1e-4),
        l2=1e-4,
        intercept_lr=0.05,
    )
    features = rng.normal(size=(400, N)) * rng.uniform(0.1, 50.0, size=N)
    features[:, CONSTANT] = 1.0
    clicked = rng.random(400) < 0.3
    model.learn_many(features, clicked)
    for row, label in zip(features, clicked, strict=True):
        x = dict(zip(FEATURE_NAMES, row.tolist(), strict=True))
        scaler.learn_one(x)
        regression.learn_one(scaler.transform_one(x), bool(label))
    state = model.snapshot(1).learner_state
    assert state["scaled_weights"] == {k: float(v) for k, v in regression.weights.items()}
    assert state["scaled_intercept"] == regression.intercept
    assert state["means"] == dict(scaler.means) and state["vars"] == dict(scaler.vars)
    assert state["optimizer"]["z"] == {k: float(v) for k, v in regression.optimizer.z.items()}
