"""Periodic training of the deep CTR model, and the gate a candidate must pass to be served.

:func:`train_candidate` takes the recent labelled examples, keeps a bounded
window of the newest ones, holds out the newest ``holdout`` share of that
window *by time* for validation, and trains a :class:`~models.deep_ctr.DeepCTR`
on the rest (optionally warm-started from the serving model). It returns the
candidate with its held-out AUC and logloss, and, when given the serving model,
that model's metrics on the same slice. :func:`should_publish` then refuses a
candidate that is worse than the serving one on either metric (beyond a small
tolerance) or has any NaN or infinite weight.

Training is plain blocking PyTorch on a few threads: run it in a separate
process or thread, never on the rank agent's event loop. The learner keeps a
:class:`~models.training_window.TrainingWindow` of the newest examples; the worker
hands a :class:`TrainingJob` to :func:`run_training_job` in a child process; the
job carries everything it needs (examples, the serving model's bytes) and returns a
:class:`TrainingOutcome` the worker publishes if the gate let it through.

>>> import random
>>> from engine.features import FEATURE_NAMES
>>> rng = random.Random(0)
>>> def example(t):
...     item = f"i-{rng.randrange(20)}"
...     x = rng.random()
...     p = 0.6 if item in ("i-1", "i-2", "i-3") or x > 0.8 else 0.05
...     dense = (x,) + (0.0,) * (len(FEATURE_NAMES) - 1)
...     return LabelledExample("r", item, 1, rng.random() < p, dense, float(t),
...                            user_id="u", query="q", category="c", brand="b")
>>> examples = [example(t) for t in range(3000)]
>>> small = DeepConfig(user_buckets=16, item_buckets=256, category_buckets=4,
...                    brand_buckets=4, query_buckets=16)
>>> result = train_candidate(examples, config=small, epochs=3)
>>> result.metrics["auc"] > 0.7, result.metrics["n_valid"]
(True, 600)
>>> should_publish(result.metrics, None, result.model).publish
True
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from engine.impressions import LabelledExample
from models.deep_ctr import DCNv2, DeepConfig, DeepCTR, DeepRows
from models.metrics import auc, logloss


@dataclass
class TrainResult:
    """A trained candidate, its held-out metrics, and the serving model's on the same slice."""

    model: DeepCTR
    metrics: dict
    serving_metrics: dict | None


@dataclass(frozen=True)
class Verdict:
    publish: bool
    reason: str

    def __bool__(self) -> bool:
        return self.publish


def evaluate(model: DeepCTR, rows: DeepRows) -> dict:
    """Held-out AUC and logloss of ``model`` on labelled rows."""
    p = model.predict_proba_many(rows)
    labels = rows.clicked.astype(bool).tolist()
    if not np.isfinite(p).all():
        return {"auc": float("nan"), "logloss": float("inf")}
    area = auc(p.tolist(), labels)
    return {"auc": 0.5 if area is None else area, "logloss": logloss(p.tolist(), labels)}


def train_candidate(
    examples: Sequence[LabelledExample],
    start: DeepCTR | None = None,
    serving: DeepCTR | None = None,
    config: DeepConfig | None = None,
    window: int = 50_000,
    holdout: float = 0.2,
    epochs: int = 2,
    batch_size: int = 256,
    learning_rate: float = 3e-3,
    embedding_l2: float = 1e-3,
    seed: int = 0,
    threads: int = 2,
) -> TrainResult:
    """Train a candidate on the newest ``window`` examples; validate on the newest ``holdout``.

    Parameters
    ----------
    examples
        Labelled examples, in any order (they are sorted by ``ts``).
    start
        Model to continue from (its config and scaling are kept); a fresh one otherwise.
    serving
        The serving model, evaluated on the same held-out slice (default: ``start``).
    config
        Sizes of a fresh model (ignored with ``start``).
    seed
        Makes the run deterministic (with the same threads).
    """
    began = time.perf_counter()
    ordered = sorted(examples, key=lambda e: e.ts)[-window:]
    n_valid = max(1, int(round(len(ordered) * holdout)))
    if len(ordered) - n_valid < 1:
        raise ValueError("too few examples to train and validate")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        if start is not None:
            model = DeepCTR(start.config, metrics={}, network=DCNv2(start.config))
            model.network.load_state_dict(start.network.state_dict())
        else:
            model = DeepCTR(config or DeepConfig())
        rows = model.encode(ordered)
        train = rows.take(np.arange(len(ordered) - n_valid))
        valid = rows.take(np.arange(len(ordered) - n_valid, len(ordered)))
        network = model.network
        if start is None:
            mean = train.dense.mean(axis=0)
            std = train.dense.std(axis=0)
            network.dense_mean.copy_(torch.from_numpy(np.nan_to_num(mean)))
            network.dense_std.copy_(torch.from_numpy(np.where(std > 1e-6, std, 1.0)))
            # Start from the base rate, so that early versions are calibrated.
            rate = float(np.clip(train.clicked.mean(), 1e-4, 1 - 1e-4))
            nn.init.constant_(network.out.bias, math.log(rate / (1 - rate)))
        _fit(network, train, epochs, batch_size, learning_rate, embedding_l2, generator)
        network.eval()
        metrics = evaluate(model, valid)
        metrics.update(
            n_train=len(train),
            n_valid=len(valid),
            window_start=ordered[0].ts,
            window_end=ordered[-1].ts,
            valid_start=ordered[len(ordered) - n_valid].ts,
            train_s=round(time.perf_counter() - began, 3),
        )
        model.metrics = metrics
        serving = serving if serving is not None else start
        serving_metrics = (
            None
            if serving is None
            else evaluate(serving, serving.encode(ordered[len(ordered) - n_valid :]))
        )
    finally:
        torch.set_num_threads(previous_threads)
    return TrainResult(model, metrics, serving_metrics)


def _fit(
    network: DCNv2,
    rows: DeepRows,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    embedding_l2: float,
    generator: torch.Generator,
) -> None:
    network.train()
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    tensors = rows.tensors()
    labels = torch.from_numpy(rows.clicked)
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=generator)
        for begin in range(0, len(rows), batch_size):
            index = order[begin : begin + batch_size]
            logits = network(*(t[index] for t in tensors))
            loss = loss_fn(logits, labels[index])
            if embedding_l2:
                # Penalize only the embedding rows this batch used, each once per use and
                # summed (not averaged like the loss): a strong pull towards zero that keeps
                # ids seen a few times from fitting noise. On MIND, where items are short-
                # lived and users rarely return, averaging it instead lost 0.05 nDCG@10.
                ids = [
                    network.user.weight[tensors[0][index]],
                    network.item.weight[tensors[1][index]],
                    network.category.weight[tensors[2][index]],
                    network.brand.weight[tensors[3][index]],
                ]
                # The factorization's vectors get it averaged like the loss: summed, it
                # held them at zero, and the term learned nothing.
                factors = [
                    network.user_factors.weight[tensors[0][index]],
                    network.item_factors.weight[tensors[1][index]],
                ]
                penalty = sum(u.pow(2).sum() for u in ids)
                penalty = penalty + sum(f.pow(2).sum() for f in factors) / len(index)
                loss = loss + embedding_l2 * penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def should_publish(
    candidate_metrics: Mapping,
    serving_metrics: Mapping | None,
    model: DeepCTR,
    auc_tolerance: float = 0.002,
    logloss_tolerance: float = 0.002,
) -> Verdict:
    """Whether a candidate may replace the serving model.

    Refused when any weight is NaN or infinite, when its metrics are not finite, when its
    held-out AUC is no better than chance, or when it is worse than the serving model *on
    the same held-out slice* by more than the tolerance on AUC or on logloss (relative).
    With nothing serving yet, a finite candidate better than chance is accepted.

    >>> from models.deep_ctr import DeepConfig, DeepCTR
    >>> model = DeepCTR(DeepConfig(user_buckets=4, item_buckets=4, category_buckets=4,
    ...                            brand_buckets=4, query_buckets=4))
    >>> should_publish({"auc": 0.70, "logloss": 0.30}, {"auc": 0.72, "logloss": 0.30}, model)
    Verdict(publish=False, reason='held-out AUC 0.7000 is below the serving 0.7200')
    >>> bool(should_publish({"auc": 0.72, "logloss": 0.29}, {"auc": 0.72, "logloss": 0.30}, model))
    True
    """
    if not model.is_finite():
        return Verdict(False, "the candidate has NaN or infinite weights")
    area, loss = float(candidate_metrics["auc"]), float(candidate_metrics["logloss"])
    if not (math.isfinite(area) and math.isfinite(loss)):
        return Verdict(False, "the candidate's held-out metrics are not finite")
    if area <= 0.5:
        # Not better than chance on the held-out slice (too few examples, or no signal yet):
        # whatever serves, or the online model alone, is better than this.
        return Verdict(False, f"held-out AUC {area:.4f} is no better than chance")
    if serving_metrics is None:
        return Verdict(True, "nothing is serving yet")
    serving_auc, serving_loss = float(serving_metrics["auc"]), float(serving_metrics["logloss"])
    if area < serving_auc - auc_tolerance:
        return Verdict(False, f"held-out AUC {area:.4f} is below the serving {serving_auc:.4f}")
    if loss > serving_loss * (1 + logloss_tolerance):
        return Verdict(
            False, f"held-out logloss {loss:.4f} is above the serving {serving_loss:.4f}"
        )
    return Verdict(
        True, f"AUC {area:.4f} vs {serving_auc:.4f}, logloss {loss:.4f} vs {serving_loss:.4f}"
    )


# --- periodic training in a worker ---------------------------------------------------------


@dataclass
class TrainingJob:
    """Everything one training run needs, so that it can run in another process."""

    examples: list[LabelledExample]
    serving: bytes | None = None  # the serving model, which the candidate must not be worse than
    serving_version: int | None = None
    epochs: int = 2
    threads: int = 1
    options: dict = field(default_factory=dict)  # more keyword arguments of train_candidate


@dataclass
class TrainingOutcome:
    """A trained candidate (bytes) and whether the gate lets it replace the serving model."""

    model_bytes: bytes
    metrics: dict
    serving_metrics: dict | None
    publish: bool
    reason: str
    based_on: int | None  # the serving version it was compared with


def run_training_job(job: TrainingJob) -> TrainingOutcome:
    """Train a fresh candidate on the job's window and pass it through the gate.

    Runs in the worker's training process (see ``streams/app.py``). Each candidate starts
    from scratch on the newest window: on the MIND replay, continuing the serving model
    (on the whole window, or on what it had not seen) gave candidates the gate refused
    far more often, and a worse blend (``streamrank/deep_replay.py``). The serving model's
    bytes are verified like any loaded model; one that cannot be read is not compared
    against, and the candidate then only has to be finite to be published.
    """
    serving = None
    if job.serving is not None:
        try:
            serving = DeepCTR.from_bytes(job.serving)
        except ValueError:
            serving = None
    result = train_candidate(
        job.examples, serving=serving, epochs=job.epochs, threads=job.threads, **job.options
    )
    verdict = should_publish(result.metrics, result.serving_metrics, result.model)
    return TrainingOutcome(
        result.model.to_bytes(),
        result.metrics,
        result.serving_metrics,
        verdict.publish,
        verdict.reason,
        job.serving_version if serving is not None else None,
    )


def init_training_process() -> None:
    """Initializer of the worker's training process.

    Ranking comes first on a shared machine, so the process runs niced on one thread;
    and it exits when the worker that started it is gone, even if killed outright.
    """
    os.nice(10)
    torch.set_num_threads(1)
    parent = os.getppid()

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()
