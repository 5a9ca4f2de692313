"""Live experiment metrics in the store: counters per variant, per-user sums, a time series.

Every metric is a ratio over a user's search requests (clicks per search, revenue per
search, milliseconds per search, ...), so the statistics need, per variant, the sums over
users that :class:`~engine.experiment_stats.RatioTotals` is made of. They are kept as
running sums: each event adds :meth:`RatioTotals.increments` computed from the user's
totals before it, which a per-user hash holds. Nothing is counted twice: request writes
are claimed on ``xq:{request_id}``, interaction writes ride in the feedback's batch that
claims the ``event_id``.

Keys (under the store's prefix):

=============================  =====================================================
``xp:config``                  the configuration the workers run (JSON)
``xp:{exp}:v:{variant}``       counters and per-user sums of a variant
``xp:{exp}:u:{user}``          a user's totals in an experiment (``y``, ``x:{counter}``)
``xp:{exp}:t:{bucket}``        ``{variant}:{counter}`` for one :data:`BUCKET_S` bucket
``xr:{request}``               a ranked request: assignment, items shown, teams, clicks
=============================  =====================================================

Counters of a variant: ``requests``, ``impressions`` (items shown), ``clicks`` (distinct
items clicked per request), ``clicks_at_k`` (of those, at positions ``1..k``), ``rr`` (per
request, 1 / the best position clicked), ``add_to_carts``, ``purchases``, ``revenue``
(purchase values; the catalog price when the event has none), ``latency_ms``, ``users``,
and for interleaving ``wins_a``, ``wins_b``, ``ties``. With each counter ``c`` go ``c_sq``
and ``c_xy`` (sums over users of ``x**2`` and ``x*y``, ``y`` = the user's requests), and
``requests_sq``.

>>> from engine.experiment_config import default_config
>>> from engine.store import MemoryStore
>>> store = MemoryStore()
>>> config = default_config("s", control_share=0.5)
>>> counter = ExperimentCounter(store, config)
>>> served = ServedRequest("r-1", "u-1", {"default": "personalized"}, ("i-1", "i-2"), 1.5)
>>> store.apply_many(counter.request_batches([served], now=60.0))
[True]
>>> store.apply_many(counter.request_batches([served], now=60.0))  # redelivered
[False]
>>> from engine.messages import Interaction
>>> click = Interaction("e-1", "u-1", "i-2", "click", 61.0, request_id="r-1")
>>> (writes,) = counter.interaction_writes([click], now=61.0)
>>> store.apply(writes, once="ev:e-1")
True
>>> totals = read_variant(store, "default", "personalized")
>>> totals["requests"], totals["clicks"], totals["rr"], totals["clicks_xy"]
(1.0, 1.0, 0.5, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from engine.experiment_config import METRICS, ExperimentConfig
from engine.experiment_stats import RatioTotals
from engine.features import item_key
from engine.interleaving import TIE, A, B
from engine.messages import Interaction
from engine.store import Batch, FieldsRead, HashRead, Increment, PutBlob, Read, SetFields, Write

CONFIG_KEY = "xp:config"
#: Width of a time-series bucket, seconds, and how long buckets are kept.
BUCKET_S = 10
SERIES_TTL_S = 2 * 86400
#: A user's totals are kept this long after their last event.
USER_TTL_S = 30 * 86400
#: Counters with per-user sums (each metric's numerator).
RATIO_COUNTERS = tuple(dict.fromkeys(c for c, _, _ in METRICS.values()))
PLAIN_COUNTERS = ("requests", "impressions", "wins_a", "wins_b", "ties")


def variant_key(experiment: str, variant: str) -> str:
    return f"xp:{experiment}:v:{variant}"


def user_key(experiment: str, user_id: str) -> str:
    return f"xp:{experiment}:u:{user_id}"


def series_key(experiment: str, bucket: int) -> str:
    return f"xp:{experiment}:t:{bucket}"


def request_key(request_id: str) -> str:
    return f"xr:{request_id}"


def bucket_of(ts: float) -> int:
    """The start of the time-series bucket holding ``ts`` (epoch seconds)."""
    return int(ts // BUCKET_S) * BUCKET_S


def config_writes(config: ExperimentConfig) -> list[Write]:
    """Publish the configuration the workers run, for reports to read."""
    return [PutBlob(CONFIG_KEY, config.to_json())]


@dataclass(frozen=True, slots=True)
class ServedRequest:
    """What the experiments count of one answered request.

    ``items`` are the items shown (top first), ``teams`` their team when interleaved, for
    the variant ``interleaved`` = (experiment, variant).
    """

    request_id: str
    user_id: str
    variants: dict[str, str]  # experiment -> variant
    items: tuple[str, ...]
    latency_ms: float
    teams: tuple[str, ...] | None = None
    interleaved: tuple[str, str] | None = None


@dataclass(slots=True)
class ExperimentState:
    """Ranked requests' records and users' totals (``(experiment, user)``) as a batch of
    interactions leaves them."""

    records: dict[str, dict[str, str]] = field(default_factory=dict)
    users: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)


@dataclass(slots=True)
class _Change:
    """Increments for one event, gathered per key."""

    writes: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, key: str, amounts: dict[str, float]) -> None:
        target = self.writes.setdefault(key, {})
        for name, amount in amounts.items():
            if amount:
                target[name] = target.get(name, 0.0) + amount

    def increments(self, ttl_of) -> list[Write]:
        return [Increment(k, a, ttl_of(k)) for k, a in self.writes.items() if a]


class ExperimentCounter:
    """Turns answered requests and interactions into the store writes of the live metrics.

    Parameters
    ----------
    store
        Read once per batch (users' totals, ranked requests); never written here.
    config
        The experiments (for ``k`` of CTR@k and the CUPED covariate); may be replaced.
    request_ttl_s
        How long a ranked request's record waits for its clicks (the impression window).
    """

    def __init__(self, store, config: ExperimentConfig, request_ttl_s: int = 1800 + 300):
        self.store = store
        self.config = config
        self.request_ttl_s = request_ttl_s

    def _ttl(self, key: str) -> int:
        if key.startswith("xr:"):
            return self.request_ttl_s
        if ":t:" in key:
            return SERIES_TTL_S
        if ":u:" in key:
            return USER_TTL_S
        return 0

    def _experiment(self, name: str):
        try:
            return self.config.experiment(name)
        except KeyError:
            return None

    # --- requests --------------------------------------------------------------------------

    def request_batches(self, served: Sequence[ServedRequest], now: float) -> list[Batch]:
        """One batch per request, claimed on its request id; one read for the whole batch."""
        pairs = list(dict.fromkeys((e, s.user_id) for s in served for e in s.variants))
        reads: list[Read] = [HashRead(user_key(e, u)) for e, u in pairs]
        pre = []
        for e, u in pairs:
            experiment = self._experiment(e)
            if experiment is not None and experiment.cuped_pre_experiment:
                pre.append((e, u))
                reads.append(HashRead(user_key(experiment.cuped_pre_experiment, u)))
        replies = self.store.read(reads) if reads else []
        users = {p: _floats(r) for p, r in zip(pairs, replies, strict=False)}
        before = dict(zip(pre, replies[len(pairs) :], strict=True))
        bucket = bucket_of(now)
        batches = []
        for s in served:
            change = _Change()
            record = {
                "x": orjson.dumps(s.variants).decode(),
                "i": orjson.dumps(s.items).decode(),
            }
            for exp, variant in s.variants.items():
                user = users.setdefault((exp, s.user_id), {})
                fresh = not user.get("y")
                if fresh and (exp, s.user_id) in before:
                    experiment = self._experiment(exp)
                    counter = METRICS[experiment.primary_metric][0]
                    user["c"] = _floats(before[(exp, s.user_id)]).get(f"x:{counter}", 0.0)
                    change.add(user_key(exp, s.user_id), {"c": user["c"]})
                    change.add(variant_key(exp, variant), _covariate_start(user["c"]))
                deltas = {"latency_ms": s.latency_ms}
                counts = {"requests": 1.0, "impressions": float(len(s.items))}
                if s.interleaved == (exp, variant):
                    counts["ties"] = 1.0  # no clicks yet: a tie until one comes
                self._count(change, exp, variant, s.user_id, user, deltas, 1.0, counts, bucket)
            if s.teams is not None and s.interleaved is not None:
                record["t"] = "".join(s.teams)
                record["ie"] = s.interleaved[0]
            writes = change.increments(self._ttl)
            writes.append(SetFields(request_key(s.request_id), record, self.request_ttl_s))
            batches.append(Batch(writes, f"xq:{s.request_id}", self.request_ttl_s))
        return batches

    def _count(
        self,
        change: _Change,
        exp: str,
        variant: str,
        user_id: str,
        user: dict[str, float],
        deltas: dict[str, float],
        searches: float,
        counts: dict[str, float],
        bucket: int,
    ) -> None:
        """Add a user's growth (``deltas`` of counters, ``searches`` more requests) to the
        variant's sums, the user's totals and the bucket; updates ``user`` in place."""
        y = user.get("y", 0.0)
        covariate = user.get("c")
        sums: dict[str, float] = dict(counts)
        user_growth: dict[str, float] = {"y": searches} if searches else {}
        for counter in RATIO_COUNTERS:
            dx = deltas.get(counter, 0.0)
            x = user.get(f"x:{counter}", 0.0)
            step = RatioTotals.increments(x, y, dx, searches, new_user=not y and bool(searches))
            sums[counter] = sums.get(counter, 0.0) + step["numerator"]
            sums[f"{counter}_sq"] = step["numerator_sq"]
            sums[f"{counter}_xy"] = step["cross"]
            if counter == RATIO_COUNTERS[0]:
                sums["users"] = step["users"]
                sums["requests_sq"] = step["denominator_sq"]
            if covariate is not None:
                sums[f"{counter}_cx"] = covariate * dx
            if dx:
                user_growth[f"x:{counter}"] = dx
                user[f"x:{counter}"] = x + dx
        if covariate is not None and searches:
            sums["cov_y"] = covariate * searches
        user["y"] = y + searches
        change.add(variant_key(exp, variant), sums)
        change.add(user_key(exp, user_id), user_growth)
        series = {f"{variant}:{name}": counts.get(name, 0.0) for name in counts}
        for counter, dx in deltas.items():
            series[f"{variant}:{counter}"] = series.get(f"{variant}:{counter}", 0.0) + dx
        change.add(series_key(exp, bucket), series)

    # --- interactions ----------------------------------------------------------------------

    def interaction_writes(
        self, interactions: Sequence[Interaction], now: float
    ) -> list[list[Write]]:
        """The writes of each interaction (to commit with its event claim), in order.

        One read for the batch: the ranked requests named, the users' totals in every
        experiment, and the catalog price of purchases without a value. Later events of the
        batch see what earlier ones changed, as they would one after the other.
        """
        return self.interaction_batch(interactions, now)[0]

    def interaction_batch(
        self,
        interactions: Sequence[Interaction],
        now: float,
        unapplied: ExperimentState | None = None,
    ) -> tuple[list[list[Write]], ExperimentState]:
        """:meth:`interaction_writes`, and the records and users' totals the batch leaves.

        ``unapplied`` is what a batch still committing leaves: it stands in for what is
        read of those requests and users (``engine.feedback.Unapplied``).
        """
        requests = list(dict.fromkeys(i.request_id for i in interactions if i.request_id))
        names = [e.name for e in self.config.experiments]
        pairs = list(dict.fromkeys((e, i.user_id) for i in interactions for e in names))
        priced = list(
            dict.fromkeys(
                i.item_id for i in interactions if i.type == "purchase" and i.value is None
            )
        )
        reads: list[Read] = [HashRead(request_key(r)) for r in requests]
        reads += [HashRead(user_key(e, u)) for e, u in pairs]
        reads += [FieldsRead(item_key(i), ("price",)) for i in priced]
        replies = self.store.read(reads) if reads else []
        records = {r: dict(v) for r, v in zip(requests, replies[: len(requests)], strict=True)}
        users = {
            p: _floats(v)
            for p, v in zip(pairs, replies[len(requests) : len(requests) + len(pairs)], strict=True)
        }
        if unapplied is not None:
            records.update(
                (r, dict(unapplied.records[r])) for r in requests if r in unapplied.records
            )
            users.update((p, dict(unapplied.users[p])) for p in pairs if p in unapplied.users)
        prices = {
            i: float(v[0] or 0.0)
            for i, v in zip(priced, replies[len(requests) + len(pairs) :], strict=True)
        }
        bucket = bucket_of(now)
        out = []
        for interaction in interactions:
            record = records.get(interaction.request_id or "")
            if not record or "x" not in record:
                out.append([])
                continue
            out.append(self._interaction(interaction, record, users, prices, bucket))
        return out, ExperimentState(records, users)

    def _interaction(
        self,
        interaction: Interaction,
        record: dict[str, str],
        users: dict[tuple[str, str], dict[str, float]],
        prices: dict[str, float],
        bucket: int,
    ) -> list[Write]:
        change = _Change()
        shown = orjson.loads(record["i"])
        position = (
            shown.index(interaction.item_id) + 1
            if interaction.item_id in shown
            else interaction.position
        )
        deltas: dict[str, float] = {}
        record_update: dict[str, str] = {}
        outcome_change: tuple[str, str] | None = None
        if interaction.type == "click":
            if record.get(f"c:{interaction.item_id}"):
                return []  # the item was clicked on this page before: counted once
            record_update[f"c:{interaction.item_id}"] = "1"
            deltas["clicks"] = 1.0
            best = int(record.get("best", 0))
            if position and (best == 0 or position < best):
                deltas["rr"] = 1.0 / position - (1.0 / best if best else 0.0)
                record_update["best"] = str(position)
            teams = record.get("t", "")
            if teams and position and position <= len(teams):
                votes = {A: int(record.get("va", 0)), B: int(record.get("vb", 0))}
                old = _outcome(votes)
                votes[teams[position - 1]] += 1
                record_update["va"], record_update["vb"] = str(votes[A]), str(votes[B])
                outcome_change = (old, _outcome(votes))
        elif interaction.type == "add_to_cart":
            deltas["add_to_carts"] = 1.0
        elif interaction.type == "purchase":
            deltas["purchases"] = 1.0
            value = interaction.value
            deltas["revenue"] = value if value is not None else prices.get(interaction.item_id, 0)
        for exp, variant in orjson.loads(record["x"]).items():
            experiment = self._experiment(exp)
            if experiment is None:
                continue
            exp_deltas = dict(deltas)
            if "clicks" in deltas and position and position <= experiment.k:
                exp_deltas["clicks_at_k"] = 1.0
            counts: dict[str, float] = {}
            if outcome_change is not None and record.get("ie") == exp:
                old, new = outcome_change
                if old != new:
                    counts[_COUNTER_OF[old]] = -1.0
                    counts[_COUNTER_OF[new]] = 1.0
            user = users.setdefault((exp, interaction.user_id), {})
            self._count(
                change, exp, variant, interaction.user_id, user, exp_deltas, 0.0, counts, bucket
            )
        record.update(record_update)
        writes = change.increments(self._ttl)
        if record_update:
            writes.append(SetFields(request_key(interaction.request_id or ""), record_update, 0))
        return writes


_COUNTER_OF = {A: "wins_a", B: "wins_b", TIE: "ties"}


def _outcome(votes: dict[str, int]) -> str:
    if votes[A] == votes[B]:
        return TIE
    return A if votes[A] > votes[B] else B


def _covariate_start(c: float) -> dict[str, float]:
    return {"cov": c, "cov_sq": c * c}


def _floats(values: dict[str, str] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (values or {}).items()}


def read_variant(store, experiment: str, variant: str) -> dict[str, float]:
    """A variant's counters and sums (absent ones 0)."""
    (values,) = store.read([HashRead(variant_key(experiment, variant))])
    return _floats(values)


def ratio_totals(values: dict[str, float], counter: str) -> RatioTotals:
    """A metric's :class:`RatioTotals` (over users: ``counter`` per request) from a variant's
    hash as :func:`read_variant` gives it."""
    return RatioTotals(
        users=int(values.get("users", 0)),
        numerator=values.get(counter, 0.0),
        denominator=values.get("requests", 0.0),
        numerator_sq=values.get(f"{counter}_sq", 0.0),
        denominator_sq=values.get("requests_sq", 0.0),
        cross=values.get(f"{counter}_xy", 0.0),
    )
