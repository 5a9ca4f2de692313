"""Off-policy evaluation of streamrank's ranking on the Open Bandit Dataset (``streamrank ope``).

The question: what click-through rate would streamrank's ranking have had on
ZOZOTOWN's recommendation slots, judged from the clicks logged while a uniform-random
policy filled them? Only the random log is replayed; its propensities are exact
(1/80 per item and position), which makes inverse propensity weighting unbiased.

Protocol, per impression of ``random/`` in time order, test-then-train:

1. the ranker ranks all 80 items (the search request of :mod:`streamrank.importers.obd`)
   with what the engine learned from the earlier rows;
2. each evaluation policy turns that ranking into ``pi_e(a at p)`` for every item and
   position 1-3, and the logged row ``(a, p)`` keeps ``pi_e(a at p)``, the DR reward
   model's ``q(a, p)`` and ``sum_a pi_e(a at p) q(a, p)``, all read before its click;
3. the engine then learns the logged slate as shown (the real parsers, features,
   :class:`~engine.feedback.Feedback` and :class:`~models.online_learner.OnlineLearner`,
   over a :class:`~engine.store.MemoryStore` on the log's clock): the logged rows become
   the remembered impression, their clicks are joined to it, and the unclicked rows
   are learned as negatives when the impression's window closes.

Evaluation policies (``k = 3`` positions):

- ``streamrank greedy``: the ranking itself, ``pi_e = 1`` for the item ranked ``p``. It
  agrees with one logged row in 80, so its estimates rest on about 125 rows.
- ``streamrank PL T``: a Plackett-Luce (softmax) ranking drawn from the same scores,
  first pick with probability proportional to ``CTR^(1/T)`` (utility ``log(CTR) / T``);
  ``T = 1`` samples in proportion to the predicted CTR, small ``T`` approaches the greedy
  ranking. Marginals are exact (:func:`~models.off_policy.plackett_luce_marginals`).
- ``bts (frequencies)``: for context, the logged Bernoulli Thompson sampling policy as
  the share of its own log's rows with item ``a`` at position ``p``; it ignores the user
  and the week's drift, so compare its estimate with bts's own CTR loosely.

Every policy is estimated by IPS, SNIPS and DR (:mod:`models.off_policy`), with 95 %
normal intervals, next to the logged policies' own CTRs. The value is clicks per shown
slot. The DR reward model is the CTR of each (item, position) in the earlier rows,
shrunk to the position's CTR (:class:`~models.off_policy.ItemPositionCTR`).

Choices forced by the data:

- OBD has no retrieval stage: the candidate order (item ids) means nothing, so the
  retrieval blend weight is 0 and the score is the model's CTR estimate.
- The public sample keeps few rows of each impression (one in most), and the others'
  clicks are unknown: the engine learns each impression as the list of its logged
  rows in position order (its position curve counts slots of that list), while the
  estimates use the logged positions.
- OBD has no user ids; the importer derives one per user feature profile.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from engine.features import FeatureConfig, catalog_writes
from engine.feedback import Feedback
from engine.impressions import ImpressionConfig
from engine.messages import parse_catalog_item, parse_interaction, parse_search_request
from engine.ranking import Ranker, Ranking, RankingConfig
from engine.store import MemoryStore
from models.off_policy import (
    Estimate,
    ItemPositionCTR,
    doubly_robust,
    ips,
    on_policy,
    plackett_luce_marginals,
    snips,
    top_k_marginals,
)
from models.online_ctr import LinearCTR
from models.online_learner import OnlineLearner
from models.profile import RankingProfile
from streamrank.importers.obd import DEFAULT_POLICY, import_obd

Event = dict[str, Any]
# Turns a ranking into pi_e(item at position): (candidate CTRs, ranked candidate indices)
# -> an (items x positions) matrix whose columns sum to 1.
Policy = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class OPEOptions:
    """How the engine is run over the log and which policies are evaluated.

    ``temperatures`` are the Plackett-Luce policies' (one policy each); ``positions`` the
    slots per impression (3 in OBD); ``profile`` is the online learner's (its blend weight
    is 0: OBD has no retrieval stage, the candidate order means nothing), and the
    impression window (after which unclicked rows are learned as negatives) the engine's.
    """

    temperatures: tuple[float, ...] = (1.0, 0.25)
    positions: int = 3
    profile: RankingProfile = field(default_factory=lambda: RankingProfile(retrieval_weight=0.0))
    window_s: int = 1800
    close_every_s: float = 60.0
    features: FeatureConfig = field(default_factory=FeatureConfig)


@dataclass
class LoggedSlots:
    """The logged rows of an evaluation log, and what each policy made of each row."""

    request_ids: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    propensities: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    q_logged: list[float] = field(default_factory=list)
    target: dict[str, list[float]] = field(default_factory=dict)
    q_target: dict[str, list[float]] = field(default_factory=dict)
    impressions: int = 0


def logged_rows(events: Iterable[Event]) -> LoggedSlots:
    """The rows of an imported OBD log and their clicks, without running the engine."""
    slots = LoggedSlots()
    where: dict[tuple[str, str], int] = {}
    for event in events:
        if event["stream"] == "search-requests":
            slots.impressions += 1
            for shown in event["context"]["obd"]["shown"]:
                where[(event["request_id"], shown["item_id"])] = len(slots.items)
                _append_row(slots, event["request_id"], shown)
        elif event["stream"] == "interactions" and event.get("type") == "click":
            row = where.get((event.get("request_id"), event["item_id"]))
            if row is not None:
                slots.rewards[row] = 1.0
    return slots


def _append_row(slots: LoggedSlots, request_id: str, shown: dict) -> None:
    slots.request_ids.append(request_id)
    slots.items.append(shown["item_id"])
    slots.positions.append(int(shown["position"]))
    slots.propensities.append(float(shown["propensity"]))
    slots.rewards.append(0.0)


def frequency_policy(slots: LoggedSlots, item_ids: list[str], k: int) -> Policy:
    """A context-free policy that shows item ``a`` at ``p`` as often as a log did."""
    index = {item_id: n for n, item_id in enumerate(item_ids)}
    counts = np.zeros((len(item_ids), k))
    for item_id, position in zip(slots.items, slots.positions, strict=True):
        if item_id in index and position <= k:
            counts[index[item_id], position - 1] += 1.0
    marginals = counts / np.maximum(counts.sum(axis=0), 1.0)
    return lambda ctr, order: marginals


def streamrank_policies(temperatures: Iterable[float], k: int) -> dict[str, Policy]:
    """The greedy ranking and its Plackett-Luce versions, one per temperature."""
    policies: dict[str, Policy] = {
        "streamrank greedy": lambda ctr, order: top_k_marginals(order, len(ctr), k)
    }
    for t in temperatures:
        policies[f"streamrank PL T={t:g}"] = lambda ctr, order, t=t: plackett_luce_marginals(
            np.log(np.maximum(ctr, 1e-12)) / t, k
        )
    return policies


def run_policies(
    events: Iterable[Event],
    policies: dict[str, Policy],
    options: OPEOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> LoggedSlots:
    """Replay an imported OBD log through the engine, test-then-train, scoring ``policies``.

    Returns the logged rows with each policy's ``pi_e`` of the logged item at the logged
    position, and the DR reward model's predictions, all read before the row's click.
    """
    options = options or OPEOptions()
    k = options.positions
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0])
    config = RankingConfig(
        retrieval_weight=options.profile.retrieval_weight,
        shared_state_max_age_s=0.0,
        features=options.features,
        impressions=ImpressionConfig(
            window_s=options.window_s,
            depth=100_000,  # keep every candidate's features: the logged rows are picked later
            close_depth=k,
            logged_order_shown=True,
        ),
    )
    learner = OnlineLearner(store, publish_every_s=0.0, **options.profile.learner_options())
    ranker = Ranker(store, LinearCTR.prior(), config, clock=lambda: now[0])
    feedback = Feedback(store, config.features, config.impressions)
    slots = LoggedSlots(
        target={name: [] for name in policies}, q_target={name: [] for name in policies}
    )
    where: dict[tuple[str, str], int] = {}
    item_index: dict[str, int] = {}
    rewards: ItemPositionCTR | None = None
    learned = False
    next_close: float | None = None

    for n, event in enumerate(events, start=1):
        stream = event["stream"]
        raw = orjson.dumps({key: value for key, value in event.items() if key != "stream"})
        if stream == "search-requests":
            request = parse_search_request(raw)
            now[0] = request.ts
            if learned and learner.model.ready():
                ranker.model = learner.model.snapshot(learner.version)
                learned = False
            ids = [c.item_id for c in request.candidates]
            if rewards is None:
                item_index = {item_id: i for i, item_id in enumerate(ids)}
                rewards = ItemPositionCTR(len(ids), k)
            ranking = ranker.rank(request)
            index = {item_id: i for i, item_id in enumerate(ids)}
            order = np.array([index[item.item_id] for item in ranking.result.items])
            ctr = np.empty(len(ids))
            ctr[order] = ranking.click_probabilities
            q = rewards.predict_proba_many()[[item_index[i] for i in ids]]
            marginals = {name: policy(ctr, order) for name, policy in policies.items()}
            shown = request.context["obd"]["shown"]
            slots.impressions += 1
            for row in shown:
                a, p = index[row["item_id"]], int(row["position"])
                where[(request.request_id, row["item_id"])] = len(slots.items)
                _append_row(slots, request.request_id, row)
                slots.q_logged.append(float(q[a, p - 1]))
                for name, m in marginals.items():
                    slots.target[name].append(float(m[a, p - 1]))
                    slots.q_target[name].append(float(m[:, p - 1] @ q[:, p - 1]))
                rewards.learn_one(item_index[row["item_id"]], p, shows=1.0)
            _remember_logged_slate(ranker, ranking, ids, [index[r["item_id"]] for r in shown])
        elif stream == "interactions":
            interaction = parse_interaction(raw)
            now[0] = interaction.ts
            row = where.get((interaction.request_id or "", interaction.item_id))
            if row is not None and interaction.type == "click" and rewards is not None:
                if slots.rewards[row] == 0.0:
                    rewards.learn_one(
                        item_index[interaction.item_id], slots.positions[row], clicks=1
                    )
                slots.rewards[row] = 1.0
            # The engine finds the position in the remembered slate (see the module notes).
            plan = feedback.prepare(dataclasses.replace(interaction, position=None))
            if feedback.commit(plan) and learner.learn(interaction.event_id, plan.examples):
                learned = True
        elif stream == "catalog":
            store.apply(catalog_writes(parse_catalog_item(raw), config.features))
        if next_close is None or now[0] >= next_close:
            if learner.learn_many(feedback.close_due_sources(now[0], limit=100_000)):
                learned = True
            next_close = now[0] + options.close_every_s
        if progress is not None and n % 1000 == 0:
            progress(n)
    return slots


def _remember_logged_slate(
    ranker: Ranker, ranking: Ranking, ids: list[str], rows: list[int]
) -> None:
    """Remember what the shopper saw, the logged rows in position order, not our ranking."""
    impression = ranking.impression
    if impression is None:  # a degraded answer: nothing to join clicks to
        return
    if impression.item_ids != tuple(ids):
        raise RuntimeError("the ranker no longer remembers every candidate in input order")
    shown = dataclasses.replace(
        impression,
        item_ids=tuple(ids[r] for r in rows),
        features=impression.features[rows],
    )
    ranker.remember(dataclasses.replace(ranking, impression=shown))


def estimates(slots: LoggedSlots, policy: str) -> dict[str, Estimate]:
    """IPS, SNIPS and DR of one policy scored by :func:`run_policies`."""
    r, pb = np.array(slots.rewards), np.array(slots.propensities)
    pe = np.array(slots.target[policy])
    return {
        "IPS": ips(r, pb, pe),
        "SNIPS": snips(r, pb, pe),
        "DR": doubly_robust(r, pb, pe, slots.q_logged, slots.q_target[policy]),
    }


def evaluate_obd(
    folder: Path,
    options: OPEOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The OPE report for an OBD folder (holding ``random/`` and optionally ``bts/``).

    A policy folder alone (any logged policy) is evaluated from its own log, without
    the other policies' CTRs.
    """
    options = options or OPEOptions()
    started = time.perf_counter()
    root = folder if (folder / DEFAULT_POLICY).is_dir() else None
    evaluation = root / DEFAULT_POLICY if root is not None else folder
    events = list(import_obd(evaluation))
    item_ids = next(
        [c["item_id"] for c in e["candidates"]] for e in events if e["stream"] == "search-requests"
    )
    logged = {evaluation.name: logged_rows(events)}
    if root is not None:
        for other in sorted(p for p in root.iterdir() if p.is_dir() and p != evaluation):
            if (other / "item_context.csv").exists():
                logged[other.name] = logged_rows(import_obd(other))

    policies = streamrank_policies(options.temperatures, options.positions)
    for name, slots in logged.items():
        if name != evaluation.name:
            policies[f"{name} (frequencies)"] = frequency_policy(slots, item_ids, options.positions)
    scored = run_policies(events, policies, options, progress)

    results = []
    for name, slots in logged.items():
        clicks = int(sum(slots.rewards))
        results.append(_result(f"{name} (logged)", "on-policy", on_policy(slots.rewards), clicks))
    for name in policies:
        # The clicks an estimate rests on: logged clicks on rows the policy could have shown.
        target = np.array(scored.target[name])
        clicks = int(((target > 0) & (np.array(scored.rewards) > 0)).sum())
        for estimator, estimate in estimates(scored, name).items():
            results.append(_result(name, estimator, estimate, clicks))
    return {
        "data": {
            "evaluation_log": str(evaluation),
            "rows": len(scored.rewards),
            "impressions": scored.impressions,
            "clicks": int(sum(scored.rewards)),
            "items": len(item_ids),
            "positions": options.positions,
        },
        "options": {
            "temperatures": list(options.temperatures),
            "profile": options.profile.to_dict(),
            "window_s": options.window_s,
        },
        "results": results,
        "elapsed_s": round(time.perf_counter() - started, 3),
    }


def _result(policy: str, estimator: str, estimate: Estimate, clicks: int) -> dict[str, Any]:
    return {"policy": policy, "estimator": estimator} | estimate.to_dict() | {"clicks": clicks}


def format_table(report: dict[str, Any]) -> str:
    """The report's results as a text table, CTRs in percent.

    ``ESS`` is the effective sample size of the importance weights, ``clicks`` the logged
    clicks on rows the policy could have shown: what each estimate rests on.
    """
    data = report["data"]
    lines = [
        f"OPE on {data['evaluation_log']}: {data['rows']} rows, {data['impressions']} "
        f"impressions, {data['clicks']} clicks, {data['items']} items, "
        f"{data['positions']} positions",
        f"{'policy':<28} {'estimator':<9} {'CTR %':>7}  {'95% CI %':<17} {'n':>6} {'ESS':>8}"
        f" {'clicks':>6}",
    ]
    for row in report["results"]:
        interval = f"[{100 * row['low']:.3f}, {100 * row['high']:.3f}]"
        lines.append(
            f"{row['policy']:<28} {row['estimator']:<9} {100 * row['value']:>7.3f}  "
            f"{interval:<17} {row['n']:>6} {row['ess']:>8.1f} {row['clicks']:>6}"
        )
    return "\n".join(lines)
