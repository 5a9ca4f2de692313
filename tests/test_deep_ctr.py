"""The deep CTR model and its trainer: learning, the publish gate, safe storage."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import random
import struct
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

from engine.features import FEATURE_NAMES
from engine.impressions import LabelledExample
from models.deep_ctr import DeepConfig, DeepCTR, constant_logloss
from models.deep_trainer import (
    TrainingJob,
    evaluate,
    init_training_process,
    run_training_job,
    should_publish,
    train_candidate,
)
from models.training_window import TrainingWindow

torch.set_num_threads(1)

SMALL = DeepConfig(
    user_buckets=64, item_buckets=512, category_buckets=16, brand_buckets=16, query_buckets=64
)
HOT_ITEMS = {f"i-{k}" for k in range(0, 60, 4)}


def example(user: str, item: str, dense: tuple, clicked: bool, ts: float) -> LabelledExample:
    return LabelledExample(
        "r", item, 1, clicked, dense, ts, user_id=user, query="red shoes", category="c", brand="b"
    )


def generated(n: int = 4000, seed: int = 0) -> list[LabelledExample]:
    """Clicks depend on the item (a quarter of them are popular) and on one dense feature."""
    rng = random.Random(seed)
    examples = []
    for t in range(n):
        item = f"i-{rng.randrange(60)}"
        x = rng.random()
        logit = -3.0 + (2.0 if item in HOT_ITEMS else 0.0) + 2.5 * x
        dense = (x, rng.random()) + (0.0,) * (len(FEATURE_NAMES) - 2)
        clicked = rng.random() < 1.0 / (1.0 + np.exp(-logit))
        examples.append(example(f"u-{rng.randrange(30)}", item, dense, clicked, t))
    return examples


@pytest.fixture(scope="module")
def examples() -> list[LabelledExample]:
    return generated()


@pytest.fixture(scope="module")
def trained(examples):
    return train_candidate(examples, config=SMALL, epochs=3, threads=1)


def held_out(examples: list[LabelledExample], share: float = 0.2) -> list[LabelledExample]:
    return examples[len(examples) - round(len(examples) * share) :]


def test_trainer_beats_a_constant_predictor(examples, trained) -> None:
    train_part = examples[: len(examples) - trained.metrics["n_valid"]]
    valid = held_out(examples)
    rate = sum(e.clicked for e in train_part) / len(train_part)
    assert trained.metrics["n_valid"] == len(valid) == 800
    assert trained.metrics["valid_start"] == valid[0].ts
    assert trained.metrics["auc"] > 0.65  # a constant predictor has 0.5
    assert trained.metrics["logloss"] < constant_logloss(rate, [e.clicked for e in valid]) - 0.02
    assert trained.serving_metrics is None
    assert should_publish(trained.metrics, None, trained.model)


def test_training_is_deterministic_with_a_seed(examples, trained) -> None:
    again = train_candidate(examples, config=SMALL, epochs=3, threads=1)
    rows = trained.model.encode(held_out(examples))
    assert np.array_equal(
        again.model.predict_proba_many(rows), trained.model.predict_proba_many(rows)
    )


def test_training_window_is_bounded_and_time_ordered(examples) -> None:
    shuffled = random.Random(1).sample(examples, len(examples))
    result = train_candidate(shuffled, config=SMALL, window=1000, epochs=1, threads=1)
    assert result.metrics["n_train"] + result.metrics["n_valid"] == 1000
    assert result.metrics["window_start"] == examples[-1000].ts
    assert result.metrics["window_end"] == examples[-1].ts


def test_a_candidate_with_nan_weights_is_refused(trained) -> None:
    broken = DeepCTR.from_bytes(trained.model.to_bytes())
    with torch.no_grad():
        broken.network.item.weight[3, 0] = float("nan")
    verdict = should_publish(trained.metrics, None, broken)
    assert not verdict and "NaN" in verdict.reason
    with pytest.raises(ValueError, match="non-finite"):
        DeepCTR.from_bytes(broken.to_bytes())


def test_a_worse_candidate_is_refused_and_a_better_one_accepted(examples, trained) -> None:
    rng = random.Random(2)
    labels = [e.clicked for e in examples]
    rng.shuffle(labels)
    noise = [dataclasses.replace(e, clicked=c) for e, c in zip(examples, labels, strict=True)]
    worse = train_candidate(noise, config=SMALL, epochs=3, threads=1)
    valid_rows = worse.model.encode(held_out(examples))  # the true labels of the same slice
    worse_metrics = evaluate(worse.model, valid_rows)
    verdict = should_publish(worse_metrics, trained.metrics, worse.model)
    assert not verdict and "AUC" in verdict.reason
    # Given the serving model, the trainer evaluates it on the same held-out slice itself.
    untrained = DeepCTR(SMALL)
    better = train_candidate(examples, serving=untrained, config=SMALL, epochs=3, threads=1)
    assert better.serving_metrics == evaluate(untrained, untrained.encode(held_out(examples)))
    assert should_publish(better.metrics, better.serving_metrics, better.model)
    # Warm-started from a model, that model is the baseline by default.
    warm = train_candidate(examples, start=trained.model, epochs=1, threads=1)
    assert warm.serving_metrics == pytest.approx(
        {k: trained.metrics[k] for k in ("auc", "logloss")}
    )


def test_safetensors_round_trip_gives_identical_predictions(examples, trained) -> None:
    blob = trained.model.to_bytes()
    assert b"pickle" not in blob[:200]
    copy = DeepCTR.from_bytes(blob)
    rows = trained.model.encode(examples[:300])
    assert np.array_equal(copy.predict_proba_many(rows), trained.model.predict_proba_many(rows))
    assert copy.config == SMALL and copy.metrics["auc"] == trained.metrics["auc"]


def test_from_bytes_refuses_oversized_and_malformed_blobs(trained) -> None:
    blob = trained.model.to_bytes()
    with pytest.raises(ValueError, match="bound"):
        DeepCTR.from_bytes(blob, max_bytes=len(blob) - 1)
    with pytest.raises(ValueError):
        DeepCTR.from_bytes(b"not a model")
    with pytest.raises(ValueError):
        DeepCTR.from_bytes(blob[: len(blob) // 2])
    # A header whose config does not match the tensors.
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    inner = json.loads(header["__metadata__"]["streamrank"])
    inner["config"]["item_buckets"] = 1024
    header["__metadata__"]["streamrank"] = json.dumps(inner)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    forged = struct.pack("<Q", len(text)) + text + blob[8 + length :]
    with pytest.raises(ValueError, match="do not match"):
        DeepCTR.from_bytes(forged)


def test_request_rows_score_like_examples(examples, trained) -> None:
    batch = examples[:100]
    rows = trained.model.encode_request(
        "u-1",
        "red shoes",
        [e.item_id for e in batch],
        [e.category for e in batch],
        [e.brand for e in batch],
        np.array([e.features for e in batch]),
    )
    same_user = [dataclasses.replace(e, user_id="u-1") for e in batch]
    expected = trained.model.predict_proba_many(same_user)
    assert np.allclose(trained.model.predict_proba_many(rows), expected, atol=1e-6)
    assert trained.model.predict_proba_many([]).shape == (0,)


def test_unknown_ids_and_empty_queries_are_scored() -> None:
    model = DeepCTR(SMALL)
    rows = model.encode_request(
        "never-seen", "", ["x", "y"], ["", ""], ["", ""], np.zeros((2, len(FEATURE_NAMES)))
    )
    assert np.isfinite(model.predict_proba_many(rows)).all()


def test_a_request_is_scored_in_one_forward_pass_without_grad() -> None:
    model = DeepCTR(SMALL)
    calls = []
    model.network.register_forward_hook(
        lambda module, inputs, output: calls.append(torch.is_grad_enabled())
    )
    n = 100
    rows = model.encode_request(
        "u",
        "q",
        [f"i-{k}" for k in range(n)],
        ["c"] * n,
        ["b"] * n,
        np.zeros((n, len(FEATURE_NAMES))),
    )
    assert model.predict_proba_many(rows).shape == (n,)
    assert calls == [False]


# --- the job a worker runs in its training process -----------------------------------------


def test_training_job_is_judged_against_the_serving_model_in_a_spawned_process(examples) -> None:
    first = run_training_job(TrainingJob(examples[:3000], epochs=1, options={"config": SMALL}))
    assert first.publish and first.based_on is None and first.serving_metrics is None
    job = TrainingJob(
        examples, serving=first.model_bytes, serving_version=1, epochs=1, options={"config": SMALL}
    )
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=init_training_process) as pool:
        second = pool.submit(run_training_job, job).result(timeout=120)
    assert second.based_on == 1
    # Judged against the serving model on the same newest slice, which neither trained on.
    assert second.serving_metrics is not None and second.metrics["n_valid"] == 800
    assert second.metrics["valid_start"] > first.metrics["window_end"]
    candidate = DeepCTR.from_bytes(second.model_bytes)
    verdict = should_publish(second.metrics, second.serving_metrics, candidate)
    assert second.publish == verdict.publish


def test_an_unreadable_serving_model_is_neither_continued_nor_compared(examples) -> None:
    job = TrainingJob(examples[:1500], b"not a model", 4, epochs=1, options={"config": SMALL})
    outcome = run_training_job(job)
    assert outcome.based_on is None and outcome.serving_metrics is None
    assert outcome.publish  # finite, and nothing readable to be worse than


def test_training_window_keeps_the_newest_examples_and_waits_for_new_ones(examples) -> None:
    window = TrainingWindow(size=1000)
    assert not window.ready(min_examples=500)
    window.add(examples[:400])
    assert not window.ready(min_examples=500)  # too few yet
    window.add(examples[400:2400])
    assert window.ready(min_examples=500)
    taken = window.take()
    assert [e.ts for e in taken] == [e.ts for e in examples[1400:2400]]
    assert not window.ready(min_examples=500)  # nothing new since the last training
    window.add(examples[2400:2401])
    assert window.ready(min_examples=500)


def test_user_item_affinity_learns_what_similar_shoppers_clicked() -> None:
    """Two taste groups, no dense signal: only the user and item embeddings can tell."""
    rng = random.Random(5)
    examples = []
    for t in range(6000):
        user = rng.randrange(40)
        item = rng.randrange(40)
        liked = (user % 2) == (item % 2)
        clicked = rng.random() < (0.5 if liked else 0.05)
        dense = (0.0,) * len(FEATURE_NAMES)
        examples.append(example(f"u-{user}", f"i-{item}", dense, clicked, t))
    # Enough user buckets that a stranger does not share one with a trained shopper.
    config = dataclasses.replace(SMALL, user_buckets=4096)
    model = train_candidate(examples, config=config, epochs=10, threads=1).model
    items = [f"i-{n}" for n in range(40)]

    def affinity(user: str) -> np.ndarray:
        return model.user_item_affinity(user, items)

    right = 0
    for user in range(40):
        scores = affinity(f"u-{user}")
        right += scores[user % 2 :: 2].mean() > scores[1 - user % 2 :: 2].mean()
    assert right >= 30, right  # 20 by chance; the model without the term: 20
    stranger, known = affinity("u-never-seen"), affinity("u-0")
    assert np.abs(stranger).max() == 0.0 and np.abs(known).mean() > 0.1


def test_a_request_scores_as_its_rows_do(trained) -> None:
    """The ranker's path (user and query looked up once) gives each row's probability."""
    model = trained.model
    items = [f"i-{n}" for n in range(30)]
    dense = np.random.default_rng(2).random((30, len(FEATURE_NAMES)))
    args = ("u-3", "red running shoes", items, ["c"] * 30, ["b", "x"] * 15, dense)
    rows = model.predict_proba_many(model.encode_request(*args))
    assert model.predict_request(*args) == pytest.approx(rows, abs=1e-6)
    assert model.predict_request(
        "u-3", "", [], [], [], np.zeros((0, len(FEATURE_NAMES)))
    ).shape == (0,)


def test_a_candidate_no_better_than_chance_is_refused_even_with_nothing_serving(trained) -> None:
    verdict = should_publish({"auc": 0.47, "logloss": 0.2}, None, trained.model)
    assert not verdict.publish and "chance" in verdict.reason
    # ... and however bad the serving model is.
    worse = {"auc": 0.40, "logloss": 0.9}
    assert not should_publish({"auc": 0.5, "logloss": 0.2}, worse, trained.model).publish
