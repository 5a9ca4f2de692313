"""The online click-through-rate model: River logistic regression over the ranking features.

One learner process owns an :class:`OnlineCTR` and feeds it every labelled
example as it arrives; it publishes :class:`LinearCTR` snapshots, which are
what rankers score with: a plain weight vector, so that all candidates of a
request are scored in one matrix-vector product.

Why logistic regression with plain SGD (see ``bench/online_models.py`` for the
figures on the MIND subset): the features are a few dense, already normalized
signals (logits, log ratios, shares), where FTRL's per-coordinate sparsity buys
nothing and each update costs four times as much; SGD learns as well and keeps
the learner far ahead of the example stream.

Before it has learned anything the model starts from :data:`PRIOR_WEIGHTS`, a
hand-set prior that reads "items that get clicked, in categories and brands the
shopper likes, near the top of retrieval": the first shopper is served sensibly
and learning refines it from there.

>>> from engine.features import FEATURE_NAMES
>>> model = OnlineCTR()
>>> x = dict.fromkeys(FEATURE_NAMES, 0.0) | {"user_category_share": 1.0}
>>> before = model.predict_proba(x)
>>> for _ in range(50):
...     model.learn(x, True)
>>> model.predict_proba(x) > before
True
>>> snapshot = model.snapshot(version=1)
>>> LinearCTR.from_bytes(snapshot.to_bytes()).version
1
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import orjson
from river import linear_model, optim

from engine.features import FEATURE_NAMES

PRIOR_INTERCEPT = 0.0
PRIOR_WEIGHTS: Mapping[str, float] = {
    "item_ctr_logit": 1.0,
    "item_coec_log": 0.5,
    "query_item_coec_log": 0.5,
    "retrieval_reciprocal_rank": 0.5,
    "user_category_share": 2.0,
    "user_brand_share": 1.0,
    "user_price_match": 0.3,
    "item_available": 0.0,
}

MAX_SNAPSHOT_BYTES = 64 * 1024


@dataclass(frozen=True)
class LinearCTR:
    """Frozen weights of the online model, as rankers use them.

    ``predict_proba_many`` scores a whole feature matrix at once;
    ``contributions`` gives each feature's share of each item's log-odds.
    """

    version: int
    weights: np.ndarray
    intercept: float
    names: tuple[str, ...] = FEATURE_NAMES
    examples_seen: int = 0

    @classmethod
    def prior(cls) -> LinearCTR:
        weights = np.array([PRIOR_WEIGHTS.get(name, 0.0) for name in FEATURE_NAMES])
        return cls(version=0, weights=weights, intercept=PRIOR_INTERCEPT)

    def predict_proba_many(self, features: np.ndarray) -> np.ndarray:
        """CTR estimate of every row of ``features`` (candidates x :data:`FEATURE_NAMES`)."""
        log_odds = features @ self.weights + self.intercept
        return 1.0 / (1.0 + np.exp(-np.clip(log_odds, -30.0, 30.0)))

    def contributions(self, features: np.ndarray) -> np.ndarray:
        """Per-feature terms of each row's log-odds (the intercept excluded)."""
        return features * self.weights

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "version": self.version,
                "names": list(self.names),
                "weights": [float(w) for w in self.weights],
                "intercept": self.intercept,
                "examples_seen": self.examples_seen,
            }
        )

    @classmethod
    def from_bytes(cls, blob: bytes) -> LinearCTR:
        """Load a published snapshot; refuse anything malformed, oversized or not finite."""
        if len(blob) > MAX_SNAPSHOT_BYTES:
            raise ValueError(f"model snapshot of {len(blob)} bytes is too large")
        body = orjson.loads(blob)
        try:
            by_name = dict(zip(body["names"], body["weights"], strict=True))
            weights = np.array([float(by_name.get(name, 0.0)) for name in FEATURE_NAMES])
            intercept = float(body["intercept"])
            version = int(body["version"])
            examples_seen = int(body.get("examples_seen", 0))
        except (KeyError, TypeError) as error:
            # A missing field, a null (orjson writes NaN as null) or a body that is not an
            # object: refused like any other malformed snapshot, as a ValueError.
            raise ValueError(f"malformed model snapshot ({error!r})") from None
        if not (np.isfinite(weights).all() and math.isfinite(intercept)):
            raise ValueError("model snapshot has non-finite weights")
        return cls(
            version=version,
            weights=weights,
            intercept=intercept,
            examples_seen=examples_seen,
        )


class OnlineCTR:
    """Logistic regression learned one example at a time (River), started from the prior.

    Parameters
    ----------
    learning_rate
        SGD step size for the weights.
    l2
        L2 penalty; keeps weights of rarely active features small.
    start
        Snapshot to resume from (a restarted learner continues where it stopped);
        the hand-set prior when ``None``.
    """

    def __init__(
        self, learning_rate: float = 0.02, l2: float = 1e-4, start: LinearCTR | None = None
    ) -> None:
        start = start or LinearCTR.prior()
        self._model = linear_model.LogisticRegression(
            optimizer=optim.SGD(learning_rate), l2=l2, intercept_lr=learning_rate
        )
        for name, weight in zip(FEATURE_NAMES, start.weights, strict=True):
            self._model._weights[name] = float(weight)
        self._model.intercept = start.intercept
        self.examples_seen = start.examples_seen

    def learn(self, x: Mapping[str, float], clicked: bool) -> None:
        self._model.learn_one(x, clicked)
        self.examples_seen += 1

    def learn_many(self, features: np.ndarray, clicked: Sequence[bool]) -> None:
        """Learn from the rows of a feature matrix in order."""
        for row, label in zip(features, clicked, strict=True):
            self.learn(dict(zip(FEATURE_NAMES, row.tolist(), strict=True)), bool(label))

    def predict_proba(self, x: Mapping[str, float]) -> float:
        return self._model.predict_proba_one(x)[True]

    def snapshot(self, version: int) -> LinearCTR:
        weights = self._model.weights
        return LinearCTR(
            version=version,
            weights=np.array([weights.get(name, 0.0) for name in FEATURE_NAMES]),
            intercept=float(self._model.intercept),
            examples_seen=self.examples_seen,
        )
