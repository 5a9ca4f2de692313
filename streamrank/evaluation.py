"""Rankings judged by the clicks that came after them: the replay report of DESIGN.md.

:class:`Judge` is fed what was ranked and, later, what was clicked; its report
holds streamrank's metrics and, computed from the same events, four baselines:
the input order, an online popularity ranking (smoothed CTR ``(clicks + 0.1) /
(shown + 2)`` of what was shown and clicked before each request), an online
click count (most clicked before each request) and an online item-kNN
(:class:`ItemKNN`: the summed similarity of a candidate to the user's recent
clicks, learned from the clicks before each request; it needs the user ids).
The in-process replay and the replay through Kafka both report through it.

A request is scored once its window has passed (:meth:`Judge.settle`): only its
metrics are kept then, not its lists, so a replay of millions of requests holds
a few numbers per request.

>>> judge = Judge()
>>> judge.ranked("r-1", ["a", "b"], ["b", "a"], scores=[0.6, 0.2], click_probabilities=[0.6, 0.2])
>>> judge.clicked("r-1", "b")
>>> report = judge.report(elapsed_s=0.0)
>>> report["metrics"]["mrr"], report["baselines"]["input_order"]["mrr"]
(1.0, 0.5)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from models.metrics import RankingMetrics, list_metrics

POPULARITY_PRIOR = (0.1, 2.0)
BASELINES = ("input_order", "popularity", "click_count", "item_knn")
# Rankings whose scores are click probabilities: they get a logloss too.
PROBABILISTIC = ("streamrank", "popularity")


@dataclass(slots=True)
class ItemKNN:
    """Session-based item-kNN: items clicked by the same users are similar.

    The plain baseline of session recommendation (Ludewig & Jannach, 2018): the
    similarity of two items is the cosine of their user sets, ``co(i, j) / sqrt(n_i *
    n_j)``, where ``n_i`` counts the users who clicked ``i`` and ``co(i, j)`` those who
    clicked both, ``j`` within ``history`` distinct items of ``i``. A candidate scores the
    sum of its similarities to the user's last ``history`` distinct clicks (not to
    itself). Exact counts, in memory, without decay or bounds: a yardstick for
    ``engine.item_similarity``, not a serving component.

    >>> knn = ItemKNN()
    >>> for user in ("u-1", "u-2"):
    ...     knn.learn(user, "phone")
    ...     knn.learn(user, "case")
    >>> knn.learn("u-3", "phone")
    >>> knn.learn("u-3", "phone")  # a repeat is not a second shopper
    >>> [round(s, 3) for s in knn.scores("u-3", ["charger", "case", "phone"])]  # 2 / sqrt(3 * 2)
    [0.0, 0.816, 0.0]
    """

    history: int = 20
    _co: dict[str, dict[str, float]] = field(default_factory=dict)
    _users: dict[str, float] = field(default_factory=dict)  # n_i
    _seen: dict[str, set[str]] = field(default_factory=dict)  # each user's clicked items
    _recent: dict[str, deque[str]] = field(default_factory=dict)  # newest last, distinct

    def learn(self, user_id: str, item_id: str) -> None:
        """A click of ``user_id`` on ``item_id``."""
        seen = self._seen.setdefault(user_id, set())
        recent = self._recent.setdefault(user_id, deque())
        if item_id not in seen:
            # Each pair counts once per user: when the later of the two is first clicked.
            seen.add(item_id)
            self._users[item_id] = self._users.get(item_id, 0.0) + 1.0
            mine = self._co.setdefault(item_id, {})
            for other in recent:
                mine[other] = mine.get(other, 0.0) + 1.0
                theirs = self._co.setdefault(other, {})
                theirs[item_id] = theirs.get(item_id, 0.0) + 1.0
        if item_id in recent:
            recent.remove(item_id)
        recent.append(item_id)
        if len(recent) > self.history:
            recent.popleft()

    def scores(self, user_id: str | None, candidates: Sequence[str]) -> list[float]:
        """Each candidate's summed similarity to the user's recent clicks (0 for strangers)."""
        recent = self._recent.get(user_id) if user_id is not None else None
        if not recent:
            return [0.0] * len(candidates)
        anchors = [(self._co.get(i, {}), self._users[i]) for i in recent]
        scores = []
        for c in candidates:
            n_c = self._users.get(c)
            total = 0.0
            if n_c:
                for neighbours, n_i in anchors:
                    co = neighbours.get(c)
                    if co:
                        total += co / math.sqrt(n_i * n_c)
            scores.append(total)
        return scores


@dataclass(slots=True)
class _Shown:
    """A ranked request waiting for its clicks: each ranking's order and scores."""

    ts: float
    orders: dict[str, list[str]]
    scores: dict[str, dict[str, float]]
    click_probabilities: dict[str, float]


class Judge:
    """Collects rankings and clicks; reports metrics over requests with a click."""

    def __init__(self, window_s: float | None = None) -> None:
        """``window_s``: how long after its ranking a click still judges a request (the
        engine's impression window: later clicks teach it nothing either); None: forever."""
        self.window_s = window_s
        self._shown: dict[str, _Shown] = {}  # not yet settled
        # Settled requests in ranking order: per ranking, the metrics of the list (None
        # when nobody clicked).
        self._scored: dict[str, dict[str, dict[str, float]] | None] = {}
        self._clicked: dict[str, set[str]] = {}
        self._shown_counts: dict[str, float] = {}
        self._click_counts: dict[str, float] = {}
        self._item_knn = ItemKNN()

    def ranked(
        self,
        request_id: str,
        candidates: Sequence[str],
        ranked: Sequence[str],
        scores: Sequence[float],
        click_probabilities: Sequence[float],
        ts: float = 0.0,
        user_id: str | None = None,
    ) -> None:
        """Record streamrank's ranking of a request's candidates (in their input order);
        ``user_id`` lets the item-kNN baseline know whose recent clicks to use."""
        ids = list(candidates)
        popularity = {
            i: (self._click_counts.get(i, 0.0) + POPULARITY_PRIOR[0])
            / (self._shown_counts.get(i, 0.0) + POPULARITY_PRIOR[1])
            for i in ids
        }
        click_count = {i: self._click_counts.get(i, 0.0) for i in ids}
        item_knn = dict(zip(ids, self._item_knn.scores(user_id, ids), strict=True))
        self._shown[request_id] = _Shown(
            ts=ts,
            orders={
                "streamrank": list(ranked),
                "input_order": ids,
                "popularity": sorted(ids, key=lambda i: -popularity[i]),
                "click_count": sorted(ids, key=lambda i: -click_count[i]),
                "item_knn": sorted(ids, key=lambda i: -item_knn[i]),
            },
            scores={
                "streamrank": dict(zip(ranked, scores, strict=True)),
                "input_order": {i: -float(k) for k, i in enumerate(ids)},
                "popularity": popularity,
                "click_count": click_count,
                "item_knn": item_knn,
            },
            click_probabilities=dict(zip(ranked, click_probabilities, strict=True)),
        )
        for i in ids:
            self._shown_counts[i] = self._shown_counts.get(i, 0.0) + 1.0

    def clicked(
        self,
        request_id: str | None,
        item_id: str,
        ts: float | None = None,
        user_id: str | None = None,
    ) -> None:
        """A click, counted once per item; it judges the request it names when that request
        is not settled and the click came within the window. With ``user_id`` the item-kNN
        baseline learns from it."""
        self._click_counts[item_id] = self._click_counts.get(item_id, 0.0) + 1.0
        if user_id is not None:
            self._item_knn.learn(user_id, item_id)
        shown = self._shown.get(request_id) if request_id else None
        if shown is None or item_id not in shown.scores["input_order"]:
            return
        if self.window_s is not None and ts is not None and ts > shown.ts + self.window_s:
            return
        self._clicked.setdefault(request_id, set()).add(item_id)

    def settle(self, ranked_before: float) -> None:
        """Score the requests ranked before ``ranked_before`` (their windows have closed)."""
        while self._shown:
            request_id, shown = next(iter(self._shown.items()))
            if shown.ts >= ranked_before:
                return
            self._score(request_id, self._shown.pop(request_id))

    def _score(self, request_id: str, shown: _Shown) -> None:
        self._scored[request_id] = self._metrics(request_id, shown)

    def _metrics(self, request_id: str, shown: _Shown) -> dict[str, dict[str, float]] | None:
        clicks = self._clicked.get(request_id)
        if not clicks:
            return None
        values = {}
        for name, order in shown.orders.items():
            labels = [i in clicks for i in order]
            scores = [shown.scores[name][i] for i in order]
            probabilities = None
            if name == "streamrank":
                probabilities = [shown.click_probabilities[i] for i in order]
            elif name in PROBABILISTIC:
                probabilities = scores
            values[name] = list_metrics(labels, scores, probabilities)
        return values

    @property
    def requests(self) -> int:
        """Requests ranked so far."""
        return len(self._scored) + len(self._shown)

    def request_ids(self) -> list[str]:
        """Requests in the order they were ranked."""
        return [*self._scored, *self._shown]

    def clicks(self, request_id: str) -> set[str]:
        """The candidates of a ranked request that were clicked (labels for batch learners)."""
        return set(self._clicked.get(request_id, ()))

    def report(self, elapsed_s: float, only: set[str] | None = None) -> dict[str, Any]:
        """The report of DESIGN.md; ``only`` restricts it to some requests (a held-out part).

        Requests not settled yet count with the clicks they have so far (and stay open).
        """
        pending = {r: self._metrics(r, shown) for r, shown in self._shown.items()}
        metrics = {name: RankingMetrics() for name in ("streamrank", *BASELINES)}
        requests = with_clicks = 0
        for request_id, values in [*self._scored.items(), *pending.items()]:
            if only is not None and request_id not in only:
                continue
            requests += 1
            if values is None:
                continue
            with_clicks += 1
            for name, list_values in values.items():
                metrics[name].add_values(list_values)
        return {
            "requests": requests,
            "requests_with_clicks": with_clicks,
            "metrics": metrics["streamrank"].summary(),
            "baselines": {name: metrics[name].summary() for name in BASELINES},
            "elapsed_s": round(elapsed_s, 3),
        }
