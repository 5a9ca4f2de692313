"""Rankings judged by the clicks that came after them: the replay report of DESIGN.md.

:class:`Judge` is fed what was ranked and, later, what was clicked; its report
holds streamrank's metrics and, computed from the same events, two baselines:
the input order, and an online popularity ranking (smoothed CTR ``(clicks +
0.1) / (shown + 2)`` of what was shown and clicked before each request). The
in-process replay and the replay through Kafka both report through it.

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

from models.metrics import RankingMetrics

POPULARITY_PRIOR = (0.1, 2.0)
RANKINGS = ("streamrank", "input_order", "popularity")


@dataclass(slots=True)
class _Shown:
    """A ranked request waiting for its clicks: each ranking's order and scores."""

    candidates: list[str]
    orders: dict[str, list[str]]
    scores: dict[str, dict[str, float]]
    click_probabilities: dict[str, float]


class Judge:
    """Collects rankings and clicks; reports metrics over requests with a click."""

    def __init__(self) -> None:
        self._shown: dict[str, _Shown] = {}
        self._clicked: dict[str, set[str]] = {}
        self._shown_counts: dict[str, float] = {}
        self._click_counts: dict[str, float] = {}
        self.requests = 0

    def ranked(
        self,
        request_id: str,
        candidates: Sequence[str],
        ranked: Sequence[str],
        scores: Sequence[float],
        click_probabilities: Sequence[float],
    ) -> None:
        """Record streamrank's ranking of a request's candidates (in their input order)."""
        self.requests += 1
        ids = list(candidates)
        popularity = {
            i: (self._click_counts.get(i, 0.0) + POPULARITY_PRIOR[0])
            / (self._shown_counts.get(i, 0.0) + POPULARITY_PRIOR[1])
            for i in ids
        }
        self._shown[request_id] = _Shown(
            candidates=ids,
            orders={
                "streamrank": list(ranked),
                "input_order": ids,
                "popularity": sorted(ids, key=lambda i: -popularity[i]),
            },
            scores={
                "streamrank": dict(zip(ranked, scores, strict=True)),
                "input_order": {i: -float(k) for k, i in enumerate(ids)},
                "popularity": popularity,
            },
            click_probabilities=dict(zip(ranked, click_probabilities, strict=True)),
        )
        for i in ids:
            self._shown_counts[i] = self._shown_counts.get(i, 0.0) + 1.0

    def clicked(self, request_id: str | None, item_id: str) -> None:
        """A click, counted once per item; it judges its request when it names one."""
        self._click_counts[item_id] = self._click_counts.get(item_id, 0.0) + 1.0
        shown = self._shown.get(request_id) if request_id else None
        if shown is not None and item_id in shown.scores["input_order"]:
            self._clicked.setdefault(request_id, set()).add(item_id)

    def request_ids(self) -> list[str]:
        """Requests in the order they were ranked."""
        return list(self._shown)

    def report(self, elapsed_s: float, only: set[str] | None = None) -> dict[str, Any]:
        """The report of DESIGN.md; ``only`` restricts it to some requests (a held-out part)."""
        metrics = {name: RankingMetrics() for name in RANKINGS}
        requests = 0
        with_clicks = 0
        for request_id, shown in self._shown.items():
            if only is not None and request_id not in only:
                continue
            requests += 1
            clicks = self._clicked.get(request_id)
            if not clicks:
                continue
            with_clicks += 1
            for name, order in shown.orders.items():
                labels = [i in clicks for i in order]
                scores = [shown.scores[name][i] for i in order]
                probabilities = (
                    [shown.click_probabilities[i] for i in order]
                    if name == "streamrank"
                    else scores
                    if name == "popularity"
                    else None
                )
                metrics[name].add(labels, scores, probabilities)
        return {
            "requests": requests,
            "requests_with_clicks": with_clicks,
            "metrics": metrics["streamrank"].summary(),
            "baselines": {
                "input_order": metrics["input_order"].summary(),
                "popularity": metrics["popularity"].summary(),
            },
            "elapsed_s": round(elapsed_s, 3),
        }
