"""Experiments on simulated shoppers, where the truth is known (tests and ``bench/``).

The simulator's click model (:meth:`~streamrank.simulator.Simulator.feedback`) gives the
truth: the expected clicks of a result page are ``sum_p examination(p) *
attractiveness(item at p)``, so the true lift of one ranking over another on the same
traffic is computed, not estimated. Rankings compared:

- ``retrieval``: the search engine's order (what ``control`` serves);
- ``top_pick``: the retrieval order with the shopper's truly most attractive candidate
  moved to the top (a modest, real improvement).

Everything runs in process through the engine's experiment code: answered requests and
interactions go through :class:`~engine.experiment_metrics.ExperimentCounter` into a
:class:`~engine.store.MemoryStore`, and every look is an
:func:`~engine.experiment_report.experiment_report` (the sequential test's state kept in
the store), exactly as the workers and the report do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from engine.experiment_config import ExperimentConfig, parse_config
from engine.experiment_metrics import ExperimentCounter, ServedRequest, config_writes
from engine.experiment_report import experiment_report
from engine.experiment_stats import UNDECIDED, RatioTotals, SequentialTest, compare
from engine.experiments import assign
from engine.interleaving import team_draft
from engine.messages import parse_interaction
from engine.store import MemoryStore
from streamrank.simulator import Simulator


def retrieval_order(sim: Simulator, request: dict[str, Any]) -> list[str]:
    return [c["item_id"] for c in request["candidates"]]


def top_pick_order(sim: Simulator, request: dict[str, Any]) -> list[str]:
    """The retrieval order with the shopper's truly best candidate first."""
    order = retrieval_order(sim, request)
    best = sim.ideal_order(request)[0]
    return [best] + [i for i in order if i != best]


RANKINGS = {"retrieval": retrieval_order, "top_pick": top_pick_order}


def expected_clicks(sim: Simulator, request: dict[str, Any], order: list[str]) -> float:
    """Clicks the click model expects on the page showing ``order`` (top ``k``)."""
    shown = order[: request.get("k") or len(order)]
    cat = sim.catalog
    query = cat.queries.index(request["query"]) if request.get("query") in cat.queries else -1
    appeal = sim.attractiveness(
        sim.shopper(request["user_id"]), [cat.by_id[i] for i in shown], query
    )
    return float(sim.examination(np.arange(1, len(shown) + 1)) @ appeal)


def true_lift(seed: int, treatment: str = "top_pick", requests: int = 4000) -> float:
    """Expected clicks per search of ``treatment`` over ``retrieval``, minus one."""
    sim = Simulator(seed=seed)
    base = better = 0.0
    for _ in range(requests):
        request = sim.next_request()
        base += expected_clicks(sim, request, retrieval_order(sim, request))
        better += expected_clicks(sim, request, RANKINGS[treatment](sim, request))
    return better / base - 1.0


def ab_config(salt: str, treatment_share: float = 0.5) -> ExperimentConfig:
    return parse_config(
        {
            "experiments": [
                {
                    "name": "ab",
                    "salt": salt,
                    "variants": [
                        {"name": "retrieval", "share": 1 - treatment_share, "ranking": "control"},
                        {"name": "top_pick", "share": treatment_share},
                    ],
                    "primary_metric": "ctr",
                    "tau": {"ctr": 0.1},
                },
                {
                    "name": "il",
                    "layer": "interleaving",
                    "salt": salt,
                    "variants": [
                        {"name": "retrieval", "share": 0, "ranking": "control"},
                        {"name": "top_pick", "share": 0},
                        {
                            "name": "mix",
                            "share": 1,
                            "ranking": {"interleave": ["retrieval", "top_pick"]},
                        },
                    ],
                },
            ]
        }
    )


@dataclass
class Run:
    """What one simulated experiment found."""

    requests: int  # requests served when the test decided (or at the end)
    verdict: str
    report: dict[str, Any]


class ExperimentSimulation:
    """Simulated traffic through the experiment pipeline on a :class:`MemoryStore`.

    ``mode`` is ``"ab"`` (users split between retrieval and top_pick) or ``"interleave"``
    (every request shows the team-draft mix of both). ``drop_share`` loses that share of
    the treatment's users from the counts (a broken logging path): the sample-ratio check
    must see it.
    """

    def __init__(
        self,
        seed: int,
        mode: str = "ab",
        salt: str = "s",
        drop_share: float = 0.0,
        shoppers: int = 300,
    ):
        self.sim = Simulator(seed=seed, shoppers=shoppers)
        self.mode = mode
        self.config = ab_config(salt)
        if mode == "ab":
            self.config = ExperimentConfig(self.config.experiments[:1])
        else:
            self.config = ExperimentConfig(self.config.experiments[1:])
        self.store = MemoryStore(clock=lambda: 0.0)
        self.store.apply(config_writes(self.config))
        self.counter = ExperimentCounter(self.store, self.config)
        self.drop_share = drop_share
        self.served = 0

    def serve(self, n: int) -> None:
        """Serve ``n`` requests and apply their shoppers' feedback."""
        sim, served, events = self.sim, [], []
        for _ in range(n):
            request = sim.next_request(now=float(self.served))
            self.served += 1
            labels = assign(self.config, request["user_id"], 0.0).labels()
            teams = interleaved = None
            if self.mode == "ab":
                variant = labels["ab"]
                if variant == "top_pick" and self.drop_share:
                    user_n = int(request["user_id"].removeprefix("u-"))
                    if (user_n * 2654435761 % 1000) / 1000 < self.drop_share:
                        continue  # lost: neither the request nor its clicks are counted
                order = RANKINGS[variant](sim, request)
            else:
                merged = team_draft(
                    retrieval_order(sim, request),
                    top_pick_order(sim, request),
                    k=request["k"],
                    seed=request["request_id"],
                )
                order, teams, interleaved = list(merged.items), merged.teams, ("il", "mix")
            shown = order[: request["k"]]
            page = {"items": [{"item_id": i, "rank": r} for r, i in enumerate(shown, 1)]}
            served.append(
                ServedRequest(
                    request["request_id"],
                    request["user_id"],
                    labels,
                    tuple(shown),
                    1.0,
                    teams,
                    interleaved,
                )  # fmt: skip
            )
            events += sim.feedback(request, page, now=float(self.served))
        self.store.apply_many(self.counter.request_batches(served, now=0.0))
        interactions = [parse_interaction(orjson.dumps(e)) for e in events]
        for interaction, writes in zip(
            interactions, self.counter.interaction_writes(interactions, now=0.0), strict=True
        ):
            self.store.apply(writes, once=f"ev:{interaction.event_id}")

    def look(self) -> dict[str, Any]:
        return experiment_report(self.store, now=0.0, config=self.config)["experiments"][0]

    def run_until_decided(self, batch: int = 100, max_requests: int = 20000) -> Run:
        """Serve batches and look after each, until the always-valid test decides."""
        while True:
            self.serve(batch)
            report = self.look()
            verdict = _verdict(report)
            if verdict != UNDECIDED or self.served >= max_requests:
                return Run(self.served, verdict, report)


@dataclass
class Sensitivity:
    """Requests each of the two methods needed to decide, over seeds, and the comparison."""

    ab_requests: list[int]
    interleaving_requests: list[int]
    verdicts_agree: bool
    power: float

    @staticmethod
    def _at_power(requests: list[int], power: float) -> float:
        # Requests by which that share of the runs had decided: the sample size for that power.
        return float(np.quantile(requests, power, method="inverted_cdf"))

    @property
    def ab_at_power(self) -> float:
        return self._at_power(self.ab_requests, self.power)

    @property
    def interleaving_at_power(self) -> float:
        return self._at_power(self.interleaving_requests, self.power)

    @property
    def ratio(self) -> float:
        """How many times more requests the A/B test needs for the same power."""
        return self.ab_at_power / self.interleaving_at_power


def sensitivity(seeds: range, power: float = 0.8, batch: int = 10) -> Sensitivity:
    """A/B test and interleaving of the same two rankings on the same simulated traffic.

    Each seed is one experiment run until its always-valid test decides, looked at after
    every ``batch`` requests by both methods. A single run's stopping time is noisy (a
    sequential test may stop early by luck), so the methods are compared the way sample
    sizes are: by the requests by which a ``power`` share of the runs had decided.
    """
    ab, interleaved, agree = [], [], True
    for seed in seeds:
        a = ExperimentSimulation(seed, mode="ab").run_until_decided(batch=batch)
        b = ExperimentSimulation(seed, mode="interleave").run_until_decided(batch=batch)
        ab.append(a.requests)
        interleaved.append(b.requests)
        agree = agree and a.verdict == b.verdict != UNDECIDED
    return Sensitivity(ab, interleaved, agree, power)


def _verdict(report: dict[str, Any]) -> str:
    if report["comparisons"]:
        return report["comparisons"][0]["sequential"]["verdict"]
    if report["interleaving"]:
        return report["interleaving"][0]["sequential_verdict"]
    return UNDECIDED


def aa_false_positive_rate(
    runs: int = 500,
    requests: int = 6000,
    batch: int = 100,
    seed: int = 0,
    alpha: float = 0.05,
    tau: float = 0.1,
) -> dict[str, float]:
    """Share of A/A runs in which a test declared a difference, looking after every batch.

    The traffic (shoppers, requests, clicks on the retrieval order) is simulated once; each
    run re-randomizes the shoppers into two arms that both serve the retrieval order, with
    a salt of its own, and looks after every ``batch`` requests, with the mSPRT and with
    the fixed-horizon z-test (whose error grows with every look: the reason for the mSPRT).
    Per-user sums are built exactly as the live counters keep them.
    """
    sim = Simulator(seed=seed)
    users, clicks = [], []
    for _ in range(requests):
        request = sim.next_request()
        events = sim.feedback(request, {"items": [
            {"item_id": i, "rank": r} for r, i in enumerate(retrieval_order(sim, request), 1)
        ]})  # fmt: skip
        users.append(int(request["user_id"].removeprefix("u-")))
        clicks.append(sum(e["type"] == "click" for e in events))
    users_a, clicks_a = np.array(users), np.array(clicks, dtype=np.float64)
    n_users = users_a.max() + 1
    rng = np.random.default_rng(seed)
    sequential_fp = naive_fp = 0
    looks = requests // batch
    for _ in range(runs):
        arm = rng.random(n_users) < 0.5
        test = SequentialTest(tau=tau, alpha=alpha)
        naive = False
        x = np.zeros(n_users)
        y = np.zeros(n_users)
        for look in range(looks):
            part = slice(look * batch, (look + 1) * batch)
            np.add.at(x, users_a[part], clicks_a[part])
            np.add.at(y, users_a[part], 1.0)
            seen = y > 0
            control = RatioTotals.from_users(x[seen & ~arm], y[seen & ~arm])
            treatment = RatioTotals.from_users(x[seen & arm], y[seen & arm])
            comparison = compare(control, treatment, alpha)
            test.update(comparison)
            naive = naive or (comparison.p_value <= alpha and min(
                control.users, treatment.users) >= 100)  # fmt: skip
        sequential_fp += test.verdict != UNDECIDED
        naive_fp += naive
    return {
        "runs": runs,
        "looks": looks,
        "sequential": sequential_fp / runs,
        "fixed_horizon_peeking": naive_fp / runs,
    }
