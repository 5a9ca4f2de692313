"""The online click-through-rate model: River logistic regression over the ranking features.

One learner process owns an :class:`OnlineCTR` and feeds it every labelled
example as it arrives; it publishes :class:`LinearCTR` snapshots, which are
what rankers score with: a plain weight vector, so that all candidates of a
request are scored in one matrix-vector product.

Why standardized logistic regression with FTRL-Proximal: ``bench/online_models.py``
replays the MIND subset through the engine with each of River's optimizers
(figures in the README). FTRL's per-coordinate step sizes suit features that are
active at very different rates (a category share is zero for most shoppers, an
item CTR never is), and online standardization puts logits, log counts and shares
on one scale; together they give the best AUC and logloss. An update costs about
35 µs, so one learner keeps up with ~25,000 examples a second, far more than the
clicks of a shop. Plain SGD costs half as much and loses about 0.01 AUC.

Rankers start from :data:`PRIOR_WEIGHTS`, a hand-set prior that reads "items
that get clicked, in categories and brands the shopper likes, near the top of
retrieval, co-engaged with what the shopper just looked at", until the learner
has seen enough examples to publish a model.

>>> from engine.features import FEATURE_NAMES
>>> model = OnlineCTR(warmup_examples=100)
>>> liked = dict.fromkeys(FEATURE_NAMES, 0.0) | {"user_category_share": 1.0}
>>> other = dict.fromkeys(FEATURE_NAMES, 0.0)
>>> for _ in range(100):
...     model.learn(liked, True)
...     model.learn(other, False)
>>> model.ready(), model.predict_proba(liked) > 0.5 > model.predict_proba(other)
(True, True)
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
from river import linear_model, optim, preprocessing, utils

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
    # What shoppers engaged together with the shopper's own recent items.
    "session_similarity": 1.0,
    "history_similarity": 0.5,
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
    # The learner's own state (scaler statistics, standardized weights), so that a
    # restarted learner resumes exactly; rankers ignore it.
    learner_state: dict | None = None

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
                "intercept": float(self.intercept),
                "examples_seen": self.examples_seen,
                "learner_state": self.learner_state,
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
            learner_state = body.get("learner_state")
            if learner_state is not None and not isinstance(learner_state, dict):
                raise TypeError("learner_state must be an object")
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
            learner_state=learner_state,
        )


class OnlineCTR:
    """Standardized logistic regression learned one example at a time (River).

    ``StandardScaler() | LogisticRegression(FTRLProximal)``: the scaler keeps running means
    and variances, so features of any scale learn at the same pace; a snapshot folds
    the scaling into plain weights (``w / std``, intercept shifted by ``w * mean / std``),
    so rankers score raw features with one matrix-vector product.

    Until it has seen ``warmup_examples`` the model is not served (:meth:`ready`):
    rankers keep the hand-set prior rather than a model fitted to a handful of clicks.

    Parameters
    ----------
    optimizer
        ``"ftrl"`` (FTRL-Proximal, the default), ``"sgd"`` or ``"adam"``, for comparisons.
    learning_rate
        Step size (FTRL's alpha).
    l2
        L2 penalty on the standardized weights.
    warmup_examples
        Examples to see before the model is worth serving.
    standardize
        Scale features online (the default); off only to measure what it brings.
    start
        Snapshot to resume from (a restarted learner continues where it stopped).
    """

    def __init__(
        self,
        learning_rate: float = 0.05,
        l2: float = 1e-4,
        warmup_examples: int = 500,
        start: LinearCTR | None = None,
        optimizer: str = "ftrl",
        standardize: bool = True,
    ) -> None:
        self._scaler = StandardScaler() if standardize else None
        optimizers = {
            "sgd": lambda: optim.SGD(learning_rate),
            "adam": lambda: optim.Adam(learning_rate),
            "ftrl": lambda: FTRLProximal(alpha=learning_rate, beta=1.0, l1=0.0, l2=l2),
        }
        self._regression = linear_model.LogisticRegression(
            optimizer=optimizers[optimizer](), l2=l2, intercept_lr=learning_rate
        )
        self.warmup_examples = warmup_examples
        self.examples_seen = 0
        if start is not None and start.learner_state:
            self._restore(start.learner_state)
            self.examples_seen = start.examples_seen

    def ready(self) -> bool:
        return self.examples_seen >= self.warmup_examples

    def learn(self, x: Mapping[str, float], clicked: bool) -> None:
        if self._scaler is not None:
            self._scaler.learn_one(x)
        self._regression.learn_one(self._scaled(x), clicked)
        self.examples_seen += 1

    def _scaled(self, x: Mapping[str, float]) -> Mapping[str, float]:
        return x if self._scaler is None else self._scaler.transform_one(x)

    def learn_many(self, features: np.ndarray, clicked: Sequence[bool]) -> None:
        """Learn from the rows of a feature matrix in order."""
        for row, label in zip(np.asarray(features).tolist(), clicked, strict=True):
            self.learn(dict(zip(FEATURE_NAMES, row, strict=True)), bool(label))

    def predict_proba(self, x: Mapping[str, float]) -> float:
        return self._regression.predict_proba_one(self._scaled(x))[True]

    def snapshot(self, version: int) -> LinearCTR:
        scaled = self._regression.weights
        weights = np.zeros(len(FEATURE_NAMES))
        intercept = float(self._regression.intercept)
        for j, name in enumerate(FEATURE_NAMES):
            if self._scaler is None:
                weights[j] = scaled.get(name, 0.0)
                continue
            std = math.sqrt(self._scaler.vars.get(name, 0.0))
            if std > 0:  # River maps a constant feature to 0: it contributes nothing
                weights[j] = scaled.get(name, 0.0) / std
                intercept -= weights[j] * self._scaler.means.get(name, 0.0)
        return LinearCTR(
            version=version,
            weights=weights,
            intercept=intercept,
            examples_seen=self.examples_seen,
            learner_state=self._state(),
        )

    def _state(self) -> dict:
        """Everything needed to continue learning exactly: weights, scaler, optimizer."""
        optimizer = self._regression.optimizer
        per_feature = {
            name: {k: float(v) for k, v in getattr(optimizer, name).items()}
            for name in _OPTIMIZER_STATE
            if getattr(optimizer, name, None) is not None
        }
        scaler = self._scaler
        return {
            "scaled_weights": {k: float(v) for k, v in self._regression.weights.items()},
            "scaled_intercept": float(self._regression.intercept),
            "counts": {k: int(v) for k, v in scaler.counts.items()} if scaler else {},
            "means": {k: float(v) for k, v in scaler.means.items()} if scaler else {},
            "vars": {k: float(v) for k, v in scaler.vars.items()} if scaler else {},
            "optimizer": {"n_iterations": int(optimizer.n_iterations), **per_feature},
        }

    def _restore(self, state: Mapping) -> None:
        known = set(FEATURE_NAMES)
        if self._scaler is not None:
            for name in known & set(state["counts"]):
                self._scaler.counts[name] = int(state["counts"][name])
                self._scaler.means[name] = float(state["means"][name])
                self._scaler.vars[name] = float(state["vars"][name])
        for name in known & set(state["scaled_weights"]):
            self._regression._weights[name] = float(state["scaled_weights"][name])
        self._regression.intercept = float(state["scaled_intercept"])
        optimizer = self._regression.optimizer
        saved = state.get("optimizer", {})
        optimizer.n_iterations = int(saved.get("n_iterations", 0))
        for name in _OPTIMIZER_STATE:
            if hasattr(optimizer, name) and name in saved:
                if getattr(optimizer, name) is None:  # Adam creates its moments lazily
                    setattr(optimizer, name, utils.VectorDict())
                values = getattr(optimizer, name)
                for feature in known & set(saved[name]):
                    values[feature] = float(saved[name][feature])


class FTRLProximal(optim.FTRLProximal):
    """River's FTRL-Proximal with the same arithmetic, in plain floats: River's step calls
    ``np.sign`` on each weight's float, which costs more than the rest of the step, and
    tries its vector step first, which raises for FTRL on every example.

    >>> ours, river = FTRLProximal(alpha=0.05, l2=1e-4), optim.FTRLProximal(alpha=0.05, l2=1e-4)
    >>> weights = []
    >>> for optimizer in (ours, river):
    ...     w = {"a": 0.0, "b": 0.0}
    ...     for g in ({"a": 0.5, "b": -1.0}, {"a": -0.25, "b": 2.0}, {"a": 1.0, "b": 0.1}):
    ...         w = optimizer.step(w, g)
    ...     weights.append(w)
    >>> weights[0] == weights[1], ours.n_iterations, round(weights[0]["a"], 6)
    (True, 3, -0.008649)
    """

    def _step_with_dict(self, w, g):
        alpha, beta, l1, l2, z, n = self.alpha, self.beta, self.l1, self.l2, self.z, self.n
        for i in g:
            zi = z[i]
            if abs(zi) > l1:
                sign = (zi > 0) - (zi < 0)  # np.sign of a float that is not NaN
                w[i] = -(((beta + n[i] ** 0.5) / alpha + l2) ** -1) * (zi - sign * l1)
        is_array = isinstance(w, np.ndarray)
        for i, gi in g.items():
            ni = n[i]
            s = ((ni + gi**2) ** 0.5 - ni**0.5) / alpha
            z[i] += gi - s * (w[i] if is_array else w.get(i, 0))
            n[i] = ni + gi**2
        return w

    _step_with_vector = _step_with_dict


class StandardScaler(preprocessing.StandardScaler):
    """River's running standardization (no window, with std), the same arithmetic with
    fewer look-ups per feature.

    >>> ours, river = StandardScaler(), preprocessing.StandardScaler()
    >>> for scaler in (ours, river):
    ...     for x in (1.0, 4.0, 2.5):
    ...         scaler.learn_one({"a": x})
    >>> ours.means == river.means and ours.vars == river.vars, ours.transform_one({"a": 3.0})
    (True, {'a': 0.4082482904638631})
    """

    def learn_one(self, x):
        counts, means, vars_ = self.counts, self.means, self.vars
        for i, xi in x.items():
            count = counts[i] + 1
            counts[i] = count
            old_mean = means[i]
            mean = old_mean + (xi - old_mean) / count
            means[i] = mean
            vars_[i] += ((xi - old_mean) * (xi - mean) - vars_[i]) / count


# Per-feature accumulators of River's optimizers (FTRL: z, n; Adam: m, v).
_OPTIMIZER_STATE = ("z", "n", "m", "v")
