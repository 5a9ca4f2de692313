"""Rankings judged by the clicks that came after them: the replay report of DESIGN.md.

:class:`Judge` is fed what was ranked and, later, what was clicked; its report
holds streamrank's metrics and, computed from the same events, three baselines:
the input order, an online popularity ranking (smoothed CTR ``(clicks + 0.1) /
(shown + 2)`` of what was shown and clicked before each request) and an online
click count (most clicked before each request). The in-process replay and the
replay through Kafka both report through it.

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from models.metrics import RankingMetrics, list_metrics

POPULARITY_PRIOR = (0.1, 2.0)
BASELINES = ("input_order", "popularity", "click_count")
# Rankings whose scores are click probabilities: they get a logloss too.
PROBABILISTIC = ("streamrank", "popularity")


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

    def ranked(
        self,
        request_id: str,
        candidates: Sequence[str],
        ranked: Sequence[str],
        scores: Sequence[float],
        click_probabilities: Sequence[float],
        ts: float = 0.0,
    ) -> None:
        """Record streamrank's ranking of a request's candidates (in their input order)."""
        ids = list(candidates)
        popularity = {
            i: (self._click_counts.get(i, 0.0) + POPULARITY_PRIOR[0])
            / (self._shown_counts.get(i, 0.0) + POPULARITY_PRIOR[1])
            for i in ids
        }
        click_count = {i: self._click_counts.get(i, 0.0) for i in ids}
        self._shown[request_id] = _Shown(
            ts=ts,
            orders={
                "streamrank": list(ranked),
                "input_order": ids,
                "popularity": sorted(ids, key=lambda i: -popularity[i]),
                "click_count": sorted(ids, key=lambda i: -click_count[i]),
            },
            scores={
                "streamrank": dict(zip(ranked, scores, strict=True)),
                "input_order": {i: -float(k) for k, i in enumerate(ids)},
                "popularity": popularity,
                "click_count": click_count,
            },
            click_probabilities=dict(zip(ranked, click_probabilities, strict=True)),
        )
        for i in ids:
            self._shown_counts[i] = self._shown_counts.get(i, 0.0) + 1.0

    def clicked(self, request_id: str | None, item_id: str, ts: float | None = None) -> None:
        """A click, counted once per item; it judges the request it names when that request
        is not settled and the click came within the window."""
        self._click_counts[item_id] = self._click_counts.get(item_id, 0.0) + 1.0
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
