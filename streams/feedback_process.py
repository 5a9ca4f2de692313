"""Interactions and impressions written from a process of their own, beside the event loop.

Applying a click is CPU work (parsing it, joining it to its impression, labels,
co-engagement pairs, the experiments' counts, encoding the commit: about 0.15 ms)
that in the worker's process holds the GIL rankings need, and with Faust's own work
per message would keep one process from 3,000 interactions a second. In a child
process it runs on another core; the worker's event loop only reads the messages,
sends what the child hands back, and acks.

It also stores the impressions of answered requests and counts them in the
experiments (:func:`remember`): work of the same kind, off the ranking path, and in
the same order as the interactions, so a click's impression is stored before the
click is joined to it.

A batch goes through in two calls, so that the examples go out before the effects
commit (a crash in between re-sends examples, which the learner drops as learned):

1. :func:`prepare` parses the batch (rejects come back for ``dead-letters``), works
   out its plans and returns the learner's messages;
2. the worker sends those, then :func:`commit` starts applying the plans in the
   child's commit thread and returns what the batch before applied.

So the next batch is prepared while Redis applies this one. It is prepared on the
state this one leaves (``engine.feedback.Unapplied``), as its reads may come first;
should this commit not apply as prepared (another worker claimed one of its events
meanwhile), the next batch is prepared again before it commits. :func:`finish`
waits for the commit under way, when no batch follows. One child per worker and
one batch at a time: a user's interactions are applied in order. The functions run
in the child; :func:`start` is its initializer.

>>> import orjson
>>> from engine.store import MemoryStore
>>> from engine.experiment_config import default_config
>>> store = MemoryStore()
>>> start_with(store, RankingConfig(), Limits())
>>> click = orjson.dumps({"event_id": "e-1", "user_id": "u-1", "item_id": "i-1",
...                       "type": "click", "ts": 10.0})
>>> prepared = prepare([click, b"not json"], now=10.0, config=default_config("s"))
>>> len(prepared.rejected), prepared.newest_ts
(1, 10.0)
>>> commit().applied, finish().applied  # commit: the batch before's (none), finish: this one's
({}, {'click': 1})
>>> prepare([click], 10.0, default_config("s")).examples, commit(), finish().applied  # again
([], Committed(applied={}, clicks={}), {})
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from engine.experiment_config import ExperimentConfig, default_config
from engine.experiment_metrics import ExperimentCounter, ServedRequest
from engine.features import PositionCounts
from engine.feedback import Feedback, FeedbackPlan, Unapplied
from engine.impressions import Impression, examples_messages
from engine.messages import Interaction, InvalidMessage, Limits, parse_interaction
from engine.ranking import RankingConfig, impression_batches
from engine.redis_store import RedisStore
from engine.store import Store, StoreUnavailable
from streams.settings import BACKGROUND_REDIS_TIMEOUT_S


@dataclass(slots=True)
class Prepared:
    """What the worker does before the commit: send these, in order."""

    examples: list[bytes] = field(default_factory=list)  # messages for the learner
    rejected: list[tuple[bytes, str]] = field(default_factory=list)  # (message, reason)
    newest_ts: float = 0.0  # the newest event time of the batch (the worker's event clock)


@dataclass(slots=True)
class Committed:
    """What the commit applied (a redelivered event counts nothing)."""

    applied: dict[str, int] = field(default_factory=dict)  # interaction type -> applied
    clicks: dict[str, int] = field(default_factory=dict)  # variant -> clicks applied


_feedback: Feedback | None = None
_config = RankingConfig()
_counter: ExperimentCounter | None = None
_limits = Limits()
_now = 0.0
# The batch prepared and not yet committing, the commit under way, and the state it leaves.
_prepared: tuple[list[Interaction], list[FeedbackPlan], Unapplied] | None = None
_committing: Future[tuple[Committed, bool]] | None = None
_unapplied: Unapplied | None = None
_applied_as_prepared = True  # what the last commit finished did
_commits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamrank-commits")


def start(redis_url: str, key_prefix: str, config: RankingConfig, limits: Limits) -> None:
    """The child's initializer: its own connection to Redis."""
    store = RedisStore(redis_url, key_prefix=key_prefix, timeout_s=BACKGROUND_REDIS_TIMEOUT_S)
    start_with(store, config, limits)


def start_with(store: Store, config: RankingConfig, limits: Limits) -> None:
    global _feedback, _config, _counter, _limits, _prepared, _committing, _unapplied
    _feedback = Feedback(store, config.features, config.impressions)
    _config = config
    # A ranked request's record waits for its clicks as long as its impression does.
    _counter = ExperimentCounter(store, default_config("unset"), config.impressions.window_s + 300)
    _limits = limits
    _prepared, _committing, _unapplied = None, None, None


def remember(
    shown: list[tuple[Impression, PositionCounts]],
    served: list[ServedRequest],
    now: float,
    config: ExperimentConfig,
) -> None:
    """Store answered requests' impressions (each with the position curve its ranking saw)
    and count the requests in the experiments, each request once. With Redis down they
    are lost: the answers were given, degraded or not."""
    assert _feedback is not None and _counter is not None, "start() first"
    _counter.config = config
    try:
        batches = impression_batches(shown, _config)
        batches += _counter.request_batches(served, now)
        _feedback.store.apply_many(batches)
    except StoreUnavailable:
        pass


def prepare(raws: list[bytes], now: float, config: ExperimentConfig) -> Prepared:
    """Parse and prepare a batch, on what the commit under way leaves; keep it for
    :func:`commit` (raises ``StoreUnavailable`` when Redis is down: call again)."""
    global _prepared, _now
    assert _feedback is not None and _counter is not None, "start() first"
    prepared = Prepared()
    batch = []
    for raw in raws:
        try:
            batch.append(parse_interaction(raw, _limits))
        except InvalidMessage as error:
            prepared.rejected.append((raw, str(error)))
    _counter.config, _now = config, now
    plans, leaves = _feedback.prepare_batch(batch, _counter, now, _unapplied)
    _prepared = (batch, plans, leaves)
    prepared.examples = examples_messages(
        [(plan.event_id, plan.examples) for plan in plans if plan.examples]
    )
    prepared.newest_ts = max((i.ts for i in batch), default=0.0)
    return prepared


def commit() -> Committed:
    """Start applying the prepared batch; return what the batch before applied."""
    global _prepared, _committing, _unapplied
    assert _feedback is not None and _prepared is not None, "prepare() first"
    before = finish()
    batch, plans, leaves = _prepared
    if not _applied_as_prepared:
        # The commit before did not apply as its plans said: prepare again on what it did.
        # (Its examples went out already; the learner keeps the first of each event's.)
        plans, leaves = _feedback.prepare_batch(batch, _counter, _now, None)
    _prepared = None
    _committing = _commits.submit(_commit, batch, plans)
    _unapplied = leaves
    return before


def finish() -> Committed:
    """Wait for the commit under way; what it applied (nothing if none was under way)."""
    global _committing, _unapplied, _applied_as_prepared
    if _committing is None:
        return Committed()
    committed, _applied_as_prepared = _committing.result()
    _committing, _unapplied = None, None
    return committed


def _commit(batch: list[Interaction], plans: list[FeedbackPlan]) -> tuple[Committed, bool]:
    """Apply the plans, each event once, waiting for Redis while it is down; what applied
    and whether all of it applied as planned."""
    assert _feedback is not None
    committed = Committed()
    if not plans:
        return committed, True
    attempt = 0
    while True:
        try:
            applied_now = _feedback.commit_many(plans)
            break
        except StoreUnavailable:
            time.sleep(min(0.1 * 2**attempt, 2.0))
            attempt += 1
    for interaction, plan, applied in zip(batch, plans, applied_now, strict=True):
        if applied:
            kind = interaction.type
            committed.applied[kind] = committed.applied.get(kind, 0) + 1
            if kind == "click" and plan.variant:
                committed.clicks[plan.variant] = committed.clicks.get(plan.variant, 0) + 1
    as_prepared = all(a or p.applied_before for p, a in zip(plans, applied_now, strict=True))
    return committed, as_prepared
