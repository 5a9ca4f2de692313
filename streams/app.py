"""The Faust app: topics, agents and timers. Every decision is made in ``engine``/``models``.

Run a worker with ``faust -A streams.app worker -l info``; workers with the same
``STREAMRANK_APP_ID`` share the partitions. Requests and interactions are keyed
by user id and have the same partition count, so a user's requests and clicks
meet in the same worker.

Topics (after ``STREAMRANK_TOPIC_PREFIX``): ``search-requests`` -> rank ->
``ranked-results``; ``interactions`` -> feedback -> ``training-examples``
(one partition: one learner) -> learner -> model snapshots in Redis;
``catalog`` -> catalog; rejected input -> ``dead-letters``.

The learning worker also keeps the newest labelled examples and, every
``STREAMRANK_TRAIN_INTERVAL`` seconds, trains a deep CTR candidate in a separate,
lower-priority process; a candidate that passes the gate is published to the
registry in Redis, and every ranker loads it in a background thread and swaps it
in with one assignment.

``STREAMRANK_ROLE`` splits the work: ``all`` (default) runs every agent; a
deployment runs several ``serve`` workers and one ``learn`` worker, so that the
learner's CPU never delays a ranking.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TypeVar

import faust
import orjson
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from faust.types.auth import CredentialsT

from engine.experiment_config import ConfigWatcher, default_config
from engine.experiment_metrics import ServedRequest, config_writes
from engine.experiment_report import experiment_report
from engine.experiments import ExperimentRanking, assign, rank_assigned
from engine.features import catalog_writes
from engine.feedback import Feedback
from engine.impressions import (
    ImpressionConfig,
    LabelledExample,
    examples_messages,
)
from engine.messages import (
    InvalidMessage,
    Limits,
    dead_letter,
    parse_catalog_item,
    parse_search_request,
)
from engine.ranking import Ranker, Ranking, RankingConfig
from engine.redis_store import RedisStore
from engine.store import StoreUnavailable
from models.deep_trainer import TrainingJob, init_training_process, run_training_job
from models.online_ctr import LinearCTR
from models.online_learner import SnapshotWatcher
from models.registry import DeepModelWatcher, ModelRegistry
from streams import feedback_process, learner_process, metrics
from streams.batches import apply_in_batches
from streams.child_process import ChildProcess
from streams.experiment_page import experiment_page_html
from streams.logs import json_logging_config
from streams.settings import Settings
from streams.transport import Transport, let_producer_send

log = logging.getLogger("streamrank")
settings = Settings.from_env()

SOURCE_TOPICS = ("search-requests", "interactions", "catalog")
OUTPUT_TOPICS = ("ranked-results", "dead-letters")
EXAMPLES_TOPIC = "training-examples"
# Interactions and catalog updates are applied in batches of what arrived meanwhile
# (streams.batches): one Redis read and one atomic write per batch instead of per event
# (the write claims each of the batch's events once). At most this many: in
# bench/streaming.py 1,000 applied 3,557-4,197 interactions/s where 500 applied 3,020-3,402
# and 2,000 (a longer script holding Redis) 2,231.
FEEDBACK_BATCH = 1000
# Impressions go to the interactions process in one call per interval (a click before then
# waits for it: store_unremembered). Each call wakes the process pool's threads, which
# contend with ranking for the GIL: in eleven bench/streaming.py runs at 100 candidates,
# one after the other, each at 50 or 100 ms had a lower p99 than the 20 ms runs beside it
# (3.0-7.0x the hop against 4.1-12.0x).
REMEMBER_EVERY_S = 0.05

T = TypeVar("T")
F = TypeVar("F", bound=Callable)


class StreamrankApp(faust.App):
    """A Faust app that creates its topics first and uses the configurable transport."""

    async def on_first_start(self) -> None:
        await super().on_first_start()
        await create_topics(settings)

    async def on_started(self) -> None:
        await super().on_started()
        # A collection walks every object it tracks, and no request is answered meanwhile.
        # Everything alive at start-up is moved out of its sight; the near cache holds
        # plain tuples, which it stops tracking. Young collections come every 5,000 new
        # objects (about two requests): a few milliseconds each. (At 50,000 each one took
        # 25-50 ms here, the tail of the end-to-end latency.)
        gc.freeze()
        gc.set_threshold(5_000, 20, 100)
        # The writer thread's Python work (encoding a batch for Redis) holds the GIL for up
        # to the switch interval before the event loop gets it back: 5 ms by default, the
        # size of a whole ranking. Hand it back sooner.
        sys.setswitchinterval(0.0005)
        # The helper processes start now, in the background, not with the first message.
        for child, wanted in (
            (feedback_process_, settings.serves),
            (learner_process_, settings.learns),
        ):
            if wanted:
                asyncio.ensure_future(child.start())

    async def on_stop(self) -> None:
        await super().on_stop()
        for child in (trainer_process_, learner_process_, feedback_process_):
            child.stop()

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)


async def create_topics(settings: Settings) -> None:
    """Create the app's topics with explicit partition counts before any client uses them."""
    bootstrap = [url.split("://", 1)[-1] for url in settings.broker.split(",")]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **settings.kafka_auth())
    await admin.start()
    try:
        replicas = settings.replication_factor
        wanted = [
            NewTopic(settings.topic(name), settings.partitions, replicas)
            for name in SOURCE_TOPICS + OUTPUT_TOPICS
        ]
        wanted.append(NewTopic(settings.topic(EXAMPLES_TOPIC), 1, replicas))
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            # Another worker may win the race; its topics are as good as ours.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
    finally:
        await admin.close()


def broker_credentials(settings: Settings) -> CredentialsT | None:
    """Faust's credentials for STREAMRANK_KAFKA_*: its consumers and producers use them."""
    protocol = settings.kafka_security_protocol
    if protocol.startswith("SASL_"):
        # SASLCredentials says SASL_SSL when it has an SSL context, SASL_PLAINTEXT otherwise.
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=settings.kafka_ssl_context(),
        )
    if protocol == "SSL":
        return faust.SSLCredentials(settings.kafka_ssl_context())
    return None


app = StreamrankApp(
    settings.group_id,
    broker=settings.broker,
    broker_credentials=broker_credentials(settings),
    store="memory://",
    datadir=settings.datadir,
    web_port=settings.web_port,
    web_bind=settings.web_bind,
    topic_partitions=settings.partitions,
    topic_replication_factor=settings.replication_factor,
    broker_session_timeout=settings.broker_session_timeout_s,
    broker_heartbeat_interval=min(3.0, settings.broker_session_timeout_s / 3),
    consumer_auto_offset_reset="earliest",
    logging_config=json_logging_config() if settings.log_format == "json" else None,
)
app.fetch_max_wait_ms = settings.fetch_max_wait_ms


def _topic(name: str, partitions: int | None = None) -> faust.TopicT:
    return app.topic(
        settings.topic(name),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions or settings.partitions,
    )


def serving(decorator: Callable[[F], F]) -> Callable[[F], F]:
    """Register an agent or timer only on workers that serve (STREAMRANK_ROLE all or serve)."""
    return decorator if settings.serves else _unregistered


def learning(decorator: Callable[[F], F]) -> Callable[[F], F]:
    """Register an agent or timer only on the worker that learns (all or learn)."""
    return decorator if settings.learns else _unregistered


def training(decorator: Callable[[F], F]) -> Callable[[F], F]:
    """Register only where the deep model is trained: the learning worker, with an interval."""
    return decorator if settings.learns and settings.train_interval_s > 0 else _unregistered


def _unregistered(function: F) -> F:
    return function


requests_topic = _topic("search-requests")
results_topic = _topic("ranked-results")
interactions_topic = _topic("interactions")
catalog_topic = _topic("catalog")
dead_letters_topic = _topic("dead-letters")
examples_topic = _topic(EXAMPLES_TOPIC, partitions=1)

limits = Limits(
    max_message_bytes=settings.max_message_bytes, max_candidates=settings.max_candidates
)
ranking_config = RankingConfig(
    retrieval_weight=settings.profile.retrieval_weight,
    deep_weight=settings.profile.deep_weight,
    diversity=settings.profile.diversity,
    shared_state_max_age_s=settings.shared_state_max_age_s,
    impressions=ImpressionConfig(
        window_s=settings.impression_window_s,
        depth=settings.impression_depth,
        close_depth=settings.impression_close_depth,
        logged_order_shown=settings.logged_order_shown,
    ),
)
store = RedisStore(settings.redis_url, key_prefix=settings.topic_prefix)
ranker = Ranker(store, LinearCTR.prior(), ranking_config)
feedback = Feedback(store, ranking_config.features, ranking_config.impressions)
# Experiments: the file named by STREAMRANK_EXPERIMENTS (reloaded when it changes), else the
# default control/personalized split; their live metrics go to Redis with the impressions.
experiments = ConfigWatcher(
    settings.experiments_path, default_config(settings.experiment_salt, settings.control_share)
)
experiments.poll()
watcher = SnapshotWatcher(store)
# Helper processes (streams.child_process): the online learner's, started by the worker that
# owns the examples topic, and the one that applies interactions.
learner_process_ = ChildProcess(
    "online learner",
    learner_process.start,
    (
        settings.redis_url,
        settings.topic_prefix,
        settings.profile.learner_options(),
        settings.online_warmup_examples,
        settings.train_window,
    ),
)
feedback_process_ = ChildProcess(
    "interactions",
    feedback_process.start,
    (
        settings.redis_url,
        settings.topic_prefix,
        ranking_config,
        limits,
    ),
)
# The deep model's registry is read and written from threads (a model is megabytes: its
# transfer must not hold up the event loop), over a connection pool of its own.
registry = ModelRegistry(RedisStore(settings.redis_url, key_prefix=settings.topic_prefix))
deep_watcher = DeepModelWatcher(registry)
# Deep candidates train in a helper process of their own, started at the first training.
trainer_process_ = ChildProcess("deep trainer", init_training_process)


class EventClock:
    """The time of the newest event seen, never ahead of the wall clock.

    Impression windows close on it: live, events carry about the current time; a log
    replayed through Kafka (`streamrank replay --via-kafka`) carries its own, and its
    windows then close as they would have when it was recorded. A producer whose clock
    runs ahead cannot close windows early.
    """

    def __init__(self) -> None:
        self.newest = 0.0

    def saw(self, ts: float) -> None:
        if ts > self.newest:
            self.newest = ts

    def now(self) -> float:
        wall = time.time()
        return min(self.newest, wall) if self.newest > 0 else wall


event_clock = EventClock()


async def accepted(raws: list[bytes], parse: Callable, topic: faust.TopicT) -> list:
    """The messages of a batch that parse; the others go to dead-letters with the reason."""
    messages = []
    for raw in raws:
        try:
            messages.append(parse(raw, limits))
        except InvalidMessage as error:
            await reject(topic.get_topic_name(), error, raw)
    return messages


async def reject(topic: str, error: InvalidMessage | str, raw: bytes) -> None:
    log.info("dead letter from %s: %s", topic, error)
    metrics.dead_letters.labels(topic).inc()
    await dead_letters_topic.send(value=dead_letter(topic, str(error), raw))


async def until_applied(operation: Callable[[], Awaitable[T]]) -> T:
    """Run an operation that needs Redis until Redis answers.

    Interactions, catalog updates and training examples must not be dropped, so their
    agents wait here while Redis is down (the rank agent keeps answering, degraded).
    """
    attempt = 0
    while True:
        try:
            return await operation()
        except StoreUnavailable:
            if attempt == 0:
                log.warning("Redis unreachable; waiting for it")
            await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
            attempt += 1


@serving(app.agent(requests_topic))
async def rank(requests):
    async for raw in requests:
        started = time.perf_counter()
        try:
            request = parse_search_request(raw, limits)
        except InvalidMessage as error:
            await reject(requests_topic.get_topic_name(), error, raw)
            continue
        event_clock.saw(request.ts)
        assignment = assign(experiments.current, request.user_id, time.time())
        ranked = rank_assigned(ranker, request, assignment, started)
        ranking = ranked.ranking
        variant = ranking.result.variant
        await results_topic.send(key=request.user_id.encode(), value=ranking.result.to_json())
        metrics.request_latency.labels(variant).observe(time.perf_counter() - started)
        metrics.requests.labels(variant, str(ranking.result.degraded).lower()).inc()
        metrics.impressions.labels(variant).inc(len(ranking.result.items))
        if ranking.impression is not None:
            unremembered.append(ranking)
            if assignment.arms:
                uncounted.append(served_request(ranked))
        # The result leaves before the next request is ranked (bench/streaming.py, four runs
        # at 100 candidates: p99 35.7 and 39.4 ms with this, 50.1 and 93.7 ms without).
        await let_producer_send()


# Rankings whose impressions are not yet stored. A timer hands them to the interactions
# process every REMEMBER_EVERY_S, off the path between a result and its send; a worker that
# dies loses at most that long's impressions (their clicks then teach no labels).
unremembered: list[Ranking] = []
# Answered requests not yet counted in the experiments' metrics: counted with the impressions.
uncounted: list[ServedRequest] = []


def served_request(ranked: ExperimentRanking) -> ServedRequest:
    result = ranked.ranking.result
    depth = ranking_config.impressions.depth
    return ServedRequest(
        request_id=result.request_id,
        user_id=result.user_id,
        variants=ranked.assignment.labels(),
        items=tuple(item.item_id for item in result.items[:depth]),
        latency_ms=result.latency_ms,
        teams=ranked.teams[:depth] if ranked.teams is not None else None,
        interleaved=ranked.interleaved,
    )


# Redis writes of the catalog (and closing impression windows) run here, one at a time and
# in order: while a batch waits on Redis, the event loop goes on ranking.
store_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamrank-writes")


@serving(app.timer(interval=REMEMBER_EVERY_S))
async def remember_impressions() -> None:
    # Handed over, not awaited: the next tick need not wait for Redis to answer this one.
    if unremembered or uncounted:
        asyncio.ensure_future(store_unremembered())


async def store_unremembered() -> None:
    """Have the interactions process store the pending impressions and count their requests
    (``feedback_process.remember``), off the event loop.

    Returns when they are stored, and everything handed to that process before: the
    feedback agent awaits it before it joins clicks to impressions. Each request is
    claimed once ("rq:" for its impression, "xq:" for its experiment counts); with Redis
    down, or the process dying meanwhile, both are lost (the answer was given).
    """
    shown = [(r.impression, r.positions) for r in unremembered if r.impression is not None]
    served = uncounted[:]
    del unremembered[:], uncounted[:]
    with contextlib.suppress(BrokenProcessPool):
        await feedback_process_.call(
            feedback_process.remember, shown, served, time.time(), experiments.current
        )


@serving(app.agent(interactions_topic))
async def learn_from_feedback(interactions):
    await apply_in_batches(interactions, apply_interactions, FEEDBACK_BATCH)


async def apply_interactions(raws: list[bytes]) -> Awaitable[None]:
    """Apply a batch in the interactions process (``streams.feedback_process``); return what
    completes once its commit is done, for the batching to ack its messages on.

    The batch is prepared while the one before commits, its examples are sent, then its
    commit starts: examples first, then the effects (a crash in between re-sends examples,
    which the learner drops as already learned).
    """
    global in_flight
    # A user's requests and clicks share a partition, so their impressions were ranked here:
    # store any still pending before joining clicks to them.
    await store_unremembered()
    before = await through_feedback_process(raws)
    if in_flight is not None:
        count_committed(before)
        in_flight.done.set_result(None)
    in_flight = InFlight(raws, asyncio.get_running_loop().create_future())
    return committed(in_flight)


@dataclass
class InFlight:
    """A batch whose commit is under way in the interactions process."""

    raws: list[bytes]
    done: asyncio.Future


in_flight: InFlight | None = None


async def through_feedback_process(raws: list[bytes]) -> feedback_process.Committed:
    """Prepare, send, start the commit; what the batch before applied. If the process dies,
    the batch it was committing goes through again (claimed once either way), then this."""
    while True:
        try:
            prepared = await until_applied(
                lambda: feedback_process_.call(
                    feedback_process.prepare, raws, time.time(), experiments.current
                )
            )
            for raw, reason in prepared.rejected:
                await reject(interactions_topic.get_topic_name(), reason, raw)
            if prepared.newest_ts:
                event_clock.saw(prepared.newest_ts)
            for message in prepared.examples:
                await examples_topic.send(value=message)
            return await until_applied(lambda: feedback_process_.call(feedback_process.commit))
        except BrokenProcessPool:
            await redo_in_flight()


async def committed(batch: InFlight) -> None:
    """Wait for the batch's commit; when no batch came after it, ask for the commit here."""
    global in_flight
    if not batch.done.done() and in_flight is batch:
        try:
            finished = await until_applied(lambda: feedback_process_.call(feedback_process.finish))
        except BrokenProcessPool:
            await redo_in_flight()
        else:
            in_flight = None
            count_committed(finished)
            batch.done.set_result(None)
    await batch.done


async def redo_in_flight() -> None:
    """The interactions process died with a batch committing: apply it again, whole."""
    global in_flight
    if in_flight is None:
        return
    redo, in_flight = in_flight, None
    while True:
        try:
            await through_feedback_process(redo.raws)
            finished = await until_applied(lambda: feedback_process_.call(feedback_process.finish))
            break
        except BrokenProcessPool:
            continue
    count_committed(finished)
    redo.done.set_result(None)


def count_committed(committed: feedback_process.Committed) -> None:
    for kind, count in committed.applied.items():
        metrics.interactions.labels(kind).inc(count)
    for variant, count in committed.clicks.items():
        metrics.clicks.labels(variant).inc(count)


async def in_writer(function: Callable[..., T], *args: object) -> T:
    """Run blocking store work in the writer thread, after what was handed to it before."""
    return await asyncio.get_running_loop().run_in_executor(store_writer, function, *args)


@serving(app.agent(catalog_topic))
async def update_catalog(items):
    await apply_in_batches(items, apply_catalog_items, FEEDBACK_BATCH)


async def apply_catalog_items(raws: list[bytes]) -> None:
    writes = [
        write
        for item in await accepted(raws, parse_catalog_item, catalog_topic)
        for write in catalog_writes(item, ranking_config.features)
    ]
    if writes:
        await until_applied(lambda: apply_catalog(writes))


async def apply_catalog(writes: list) -> None:
    await in_writer(store.apply, writes)


async def send_examples(sources: list[tuple[str, list[LabelledExample]]]) -> None:
    """Messages of several source events each (the learner claims each source once)."""
    for message in examples_messages(sources):
        await examples_topic.send(value=message)


@learning(app.agent(examples_topic))
async def learn(messages):
    async for raw in messages:
        learned = await until_applied(
            lambda raw=raw: in_learner(learner_process.learn_message, raw, watcher.version or 0)
        )
        metrics.examples_learned.inc(learned)


async def in_learner(function: Callable[..., T], *args: object) -> T:
    """Run ``function`` in the learner's process (what a process that died had claimed and
    not learned is lost, as on a worker crash; the call is made again in a new one)."""
    while True:
        with contextlib.suppress(BrokenProcessPool):
            return await learner_process_.call(function, *args)


@training(app.timer(interval=settings.train_interval_s or 1.0))
async def train_deep_model() -> None:
    """Train a deep candidate on the window, off the event loop; publish it if it passes."""
    examples = await in_learner(learner_process.training_examples, settings.train_min_examples)
    if examples is None:
        return
    try:
        serving_version = await asyncio.to_thread(registry.serving_version)
        serving = None
        if serving_version is not None:
            serving = await asyncio.to_thread(registry.read_blob, serving_version)
    except (StoreUnavailable, LookupError) as error:
        log.warning("deep training postponed: %s", error)
        return
    job = TrainingJob(examples, serving, serving_version, epochs=settings.train_epochs)
    try:
        outcome = await trainer_process_.call(run_training_job, job)
        if not outcome.publish:
            log.info("deep candidate refused: %s", outcome.reason)
            metrics.deep_candidates.labels("refused").inc()
            return
        window = (outcome.metrics["window_start"], outcome.metrics["window_end"])
        version = await asyncio.to_thread(
            registry.publish, outcome.model_bytes, outcome.metrics, window
        )
    except Exception:  # a failed run must not stop the timer: the next one retries
        log.exception("deep training failed")
        metrics.deep_candidates.labels("failed").inc()
        return
    metrics.deep_candidates.labels("published").inc()
    log.info("deep model version %d published: %s", version, outcome.reason)


@app.timer(interval=0.25)
async def follow_model() -> None:
    """Swap in a newly published model; a request in flight keeps the one it started with."""
    try:
        snapshot = watcher.poll()
    except StoreUnavailable:
        return
    except ValueError as error:  # a malformed snapshot: keep serving the current model
        log.warning("ignoring model snapshot: %s", error)
        return
    if snapshot is not None:
        ranker.model = snapshot
        metrics.model_version.labels("online").set(snapshot.version)


@learning(app.timer(interval=0.25))
async def publish_learned() -> None:
    """Publish what the learner learned since its last version, once the interval passed
    (it publishes as it learns too; this covers the end of a burst)."""
    if learner_process_.started:  # not while it starts: that takes seconds
        with contextlib.suppress(StoreUnavailable):
            await in_learner(learner_process.publish_if_due)


@serving(app.timer(interval=1.0))
async def follow_deep_model() -> None:
    """Load a newly served deep model in a thread, then swap it in with one assignment."""
    try:
        model = await asyncio.to_thread(deep_watcher.poll)
    except StoreUnavailable:
        return
    if model is not None:
        ranker.deep_model = model
        metrics.model_version.labels("deep").set(model.version)
        log.info("serving deep model version %d", model.version)


@serving(app.timer(interval=5.0))
async def close_impression_windows() -> None:
    """Impressions whose window has closed teach their last negatives."""
    try:
        sources = await in_writer(feedback.close_due_sources, event_clock.now())
    except StoreUnavailable:
        return
    await send_examples(sources)


@app.timer(interval=5.0)
async def measure_consumer_lag() -> None:
    metrics.update_consumer_lag(app.monitor.tp_end_offsets, app.monitor.tp_read_offsets)


@serving(app.timer(interval=1.0))
async def follow_experiments() -> None:
    """Reload the experiments file when it changes (a bad one is logged, the last kept), and
    publish the configuration running for the reports."""
    error = experiments.error
    config = experiments.poll()
    if config is not None:
        log.info("experiments reloaded from %s: %s", config.source,
                 ", ".join(e.name for e in config.experiments) or "none")  # fmt: skip
    elif experiments.error and experiments.error != error:
        log.error("experiments file rejected, keeping the previous one: %s", experiments.error)
    global experiments_published
    if config is not None or time.monotonic() - experiments_published > 30.0:
        try:
            store.apply(config_writes(experiments.current))
            experiments_published = time.monotonic()
        except StoreUnavailable:
            pass


experiments_published = -math.inf


@app.page("/experiments")
async def experiments_page(web, request):
    """The live report: numbers and a chart per metric over time, drawn by inline JS."""
    return web.html(experiment_page_html())


@app.page("/experiments.json")
async def experiments_json(web, request):
    try:
        report = experiment_report(store, time.time(), experiments.current)
    except StoreUnavailable:
        return web.json({"error": "Redis unreachable"}, status=503)
    return web.bytes(orjson.dumps(report), content_type="application/json")


@app.page("/metrics")
async def prometheus_metrics(web, request):
    return web.bytes(metrics.exposition(), content_type="text/plain; version=0.0.4")


@app.page("/health")
async def health(web, request):
    healthy = store.ping()
    return web.json(
        {"ok": healthy, "redis": healthy, "model_version": ranker.model_version()},
        status=200 if healthy else 503,
    )
