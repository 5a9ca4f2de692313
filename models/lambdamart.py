"""LambdaMART (LightGBM): a batch learning-to-rank peer for the online CTR model.

The model Metarank and Elasticsearch LTR users rely on: gradient-boosted trees
trained on whole ranked lists with the LambdaRank gradient, which weighs each pair
of items by how much swapping them would change nDCG. It learns offline, from a
log's first part, and is then frozen: the benches set it beside streamrank, which
keeps learning from every click, to show what online learning gains or loses
against batch learning-to-rank on the same features.

LightGBM's native API (``lightgbm.train`` with ``objective="lambdarank"``) is the
same algorithm as its ``LGBMRanker`` without the scikit-learn dependency that the
wrapper needs. It comes with the ``eval`` extra and is imported when a model is fit.

>>> import numpy as np
>>> from models.metrics import RankingMetrics
>>> rng = np.random.default_rng(0)
>>> lists = [rng.normal(size=(20, 3)) for _ in range(300)]
>>> labels = [x[:, 0] + rng.normal(size=20) > 1.5 for x in lists]  # feature 0 matters
>>> model = LambdaMART(n_estimators=50).fit(lists[:200], labels[:200])
>>> ranked, unranked = RankingMetrics(), RankingMetrics()
>>> for x, y in zip(lists[200:], labels[200:]):
...     scores = model.score(x)
...     order = np.argsort(-scores, kind="stable")
...     ranked.add(y[order].tolist(), scores[order].tolist())
...     unranked.add(y.tolist(), [0.0] * len(y))  # the input order: random here
>>> round(ranked.summary()["ndcg@10"], 2), round(unranked.summary()["ndcg@10"], 2)
(0.72, 0.27)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class LambdaMART:
    """A LightGBM LambdaMART ranker: fit on ranked lists, then score a list's candidates.

    Parameters
    ----------
    n_estimators, learning_rate, num_leaves, min_child_samples
        The boosting knobs. The defaults suit a few thousand lists of tens of candidates
        with noisy clicks: small trees (deep ones fit the noise within a few rounds).
    seed, num_threads
        One seed and deterministic training: two fits on the same lists give the same
        trees (LightGBM is deterministic with ``deterministic`` and row-wise histograms).
    params
        Any other LightGBM parameter, e.g. ``lambdarank_truncation_level``.

    Attributes
    ----------
    booster
        The trained ``lightgbm.Booster`` (``booster.save_model(path)`` writes it as text).
    best_iteration
        Boosting rounds the model uses: ``n_estimators``, or fewer after early stopping.
    best_score
        After early stopping, the validation lists' nDCG@10 at ``best_iteration``.
    """

    def __init__(
        self,
        n_estimators: int = 200,
        learning_rate: float = 0.05,
        num_leaves: int = 15,
        min_child_samples: int = 50,
        seed: int = 0,
        num_threads: int = 1,
        **params: Any,
    ) -> None:
        self.n_estimators = n_estimators
        self.params: dict[str, Any] = {
            "objective": "lambdarank",
            "learning_rate": learning_rate,
            "num_leaves": num_leaves,
            "min_child_samples": min_child_samples,
            "seed": seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": num_threads,
            "verbosity": -1,
            **params,
        }
        self.booster: Any = None
        self.best_iteration = 0
        self.best_score: float | None = None

    def fit(
        self,
        features: Sequence[np.ndarray],
        labels: Sequence[Sequence[bool]],
        feature_names: Sequence[str] | None = None,
        valid: tuple[Sequence[np.ndarray], Sequence[Sequence[bool]]] | None = None,
        early_stopping_rounds: int = 50,
    ) -> LambdaMART:
        """Learn from lists: ``features[i]`` holds list ``i``'s candidates (one row each)
        and ``labels[i]`` whether each was clicked. Lists without both a click and a
        non-click carry no pair to learn from (LambdaRank's gradient is zero) and are
        left out.

        With ``valid`` (lists in the same form, e.g. the latest part of the training
        data), boosting stops once their nDCG@10 has not improved for
        ``early_stopping_rounds`` rounds, and :attr:`best_iteration` keeps the best count:
        trees that fit noise hurt a frozen ranker more than too few trees do.
        """
        import lightgbm  # the eval extra

        train = self._dataset(features, labels, feature_names)
        if valid is None:
            self.booster = lightgbm.train(self.params, train, num_boost_round=self.n_estimators)
            self.best_iteration = self.n_estimators
            return self
        held = self._dataset(*valid, feature_names, reference=train)
        self.booster = lightgbm.train(
            {**self.params, "metric": "ndcg", "eval_at": [10]},
            train,
            num_boost_round=self.n_estimators,
            valid_sets=[held],
            callbacks=[lightgbm.early_stopping(early_stopping_rounds, verbose=False)],
        )
        self.best_iteration = self.booster.best_iteration or self.n_estimators
        self.best_score = float(self.booster.best_score["valid_0"]["ndcg@10"])
        return self

    @staticmethod
    def _dataset(
        features: Sequence[np.ndarray],
        labels: Sequence[Sequence[bool]],
        feature_names: Sequence[str] | None,
        reference: Any = None,
    ) -> Any:
        import lightgbm

        if len(features) != len(labels):
            raise ValueError("features and labels: one entry per list")
        kept = [
            (np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float32))
            for x, y in zip(features, labels, strict=True)
            if 0 < int(np.sum(y)) < len(y)
        ]
        if not kept:
            raise ValueError("no list with both a click and a non-click to learn from")
        return lightgbm.Dataset(
            np.concatenate([x for x, _ in kept]),
            label=np.concatenate([y for _, y in kept]),
            group=[len(y) for _, y in kept],
            feature_name=list(feature_names) if feature_names is not None else "auto",
            reference=reference,
            params={"verbosity": -1},
        )

    def score(self, features: np.ndarray) -> np.ndarray:
        """Scores of a list's candidates, one per row: higher ranks first (not a probability)."""
        if self.booster is None:
            raise RuntimeError("fit the model first")
        return np.asarray(self.booster.predict(np.asarray(features, dtype=np.float32)))
