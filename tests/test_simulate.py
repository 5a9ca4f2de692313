"""``streamrank simulate``: the simulated shoppers against a broker and workers it did not start.

The end-to-end tests run the command as a subprocess from the repository root (in an
environment without ``STREAMRANK_*`` variables) against the session's broker and a worker
of the test's own topic prefix, started by the fixtures, and read the JSON summary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from streamrank.cli import build_parser
from streamrank.localstack import Broker, free_port
from streamrank.up import parse_broker

REPO_ROOT = Path(__file__).resolve().parent.parent


# --- quick checks ------------------------------------------------------------------------------


def _parse(*flags: str):
    return build_parser().parse_args(["simulate", *flags])


def test_flags_and_defaults() -> None:
    args = _parse("--broker", "kafka:9092")
    assert (args.broker, args.prefix, args.rate, args.seed, args.duration) == (
        "kafka:9092",
        None,  # resolved from STREAMRANK_TOPIC_PREFIX when it runs
        20.0,
        0,
        None,
    )
    assert (args.wait, args.catalog_wait, args.json, args.quiet) == (120.0, 0.0, False, False)
    flags = "--broker k:1 --prefix p- --rate 5 --seed 3 --duration 20 --wait 9 --json --quiet"
    args = _parse(*flags.split())
    assert (args.prefix, args.rate, args.seed, args.duration, args.wait) == ("p-", 5, 3, 20, 9)
    assert args.json and args.quiet
    for bad in ([], ["--broker", "k:1", "--rate", "0"], ["--broker", "k:1", "--wait", "-1"]):
        with pytest.raises(SystemExit):
            _parse(*bad)


@pytest.mark.parametrize(
    ("text", "bootstrap"),
    [
        ("kafka:9092", "kafka:9092"),
        ("kafka://kafka:9092", "kafka:9092"),
        ("KAFKA://k1:9092/", "k1:9092"),
        ("kafka://k1:9092,kafka://k2:9093", "k1:9092,k2:9093"),
        ("k1:9092, k2:9093", "k1:9092,k2:9093"),
        ("kafka://k1:9092;k2:9093", "k1:9092,k2:9093"),  # Faust's separator
        ("broker.internal", "broker.internal:9092"),
        ("[::1]:9092", "[::1]:9092"),
    ],
)
def test_broker_addresses(text: str, bootstrap: str) -> None:
    assert parse_broker(text) == bootstrap
    assert _parse("--broker", text).broker == bootstrap


@pytest.mark.parametrize("text", ["", ",", "http://k:9092", "k:port", "k:0", "k:9092/x", ":9092"])
def test_bad_broker_addresses(text: str) -> None:
    with pytest.raises(SystemExit):
        _parse("--broker", text)


def _fresh_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMRANK_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _simulate(*flags: str, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "streamrank.cli", "simulate", *flags],
        cwd=REPO_ROOT,
        env=env or _fresh_env(),
        **popen,
    )


def test_gives_up_when_the_topics_never_appear() -> None:
    """Nothing listens on the port: it says what it waits for, then gives up after --wait;
    the topic prefix comes from STREAMRANK_TOPIC_PREFIX, as the worker's does."""
    port = free_port()
    began = time.monotonic()
    proc = _simulate(
        "--broker",
        f"kafka://127.0.0.1:{port}",
        "--wait",
        "1.5",
        "--json",
        env=_fresh_env(STREAMRANK_TOPIC_PREFIX="shop-"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = proc.communicate(timeout=60)
    text = stderr.decode()
    assert proc.returncode == 1, text
    assert stdout == b""  # no summary: no traffic was sent
    assert "waiting for the workers to create topic 'shop-ranked-results'" in text
    assert f"did not appear on 127.0.0.1:{port} within 1.5 s" in text
    assert time.monotonic() - began < 30


def test_bad_kafka_settings_fail_at_once() -> None:
    proc = _simulate(
        "--broker",
        "127.0.0.1:9",
        env=_fresh_env(STREAMRANK_KAFKA_SECURITY_PROTOCOL="SASL_SSL"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert b"STREAMRANK_KAFKA_SASL_USERNAME" in stderr


# --- end to end --------------------------------------------------------------------------------


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        assert proc.poll() is None, path.read_text(errors="replace")
        assert time.monotonic() < deadline, f"no {text!r} in:\n{path.read_text()}"
        time.sleep(0.1)


def _finish(proc: subprocess.Popen, stdout: Path, stderr: Path, timeout: float, rc: int) -> dict:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"streamrank simulate did not finish:\n{stderr.read_text()}")
    assert proc.returncode == rc, stderr.read_text()
    return orjson.loads(stdout.read_bytes())


@pytest.mark.e2e
def test_simulate_drives_a_running_worker(
    broker: Broker, redis_server, start_worker, topic_prefix: str, tmp_path: Path
) -> None:
    """Started before the worker, it waits for the worker's topics, then runs its traffic."""
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = _simulate(
            *f"--broker {broker.bootstrap} --prefix {topic_prefix} --duration 20 --json".split(),
            *["--seed", "3", "--rate", "20"],
            stdout=out,
            stderr=err,
        )
    try:
        _wait_for_text(stderr, "waiting for the workers to create topic", proc, timeout=60)
        start_worker(control_share="0.5", online_warmup="200")
        summary = _finish(proc, stdout, stderr, timeout=120, rc=0)
    finally:
        if proc.poll() is None:
            proc.kill()

    assert summary["stopped_by"] == "duration" and summary["duration_s"] >= 19
    assert summary["broker"] == broker.bootstrap and summary["prefix"] == topic_prefix
    assert summary["seed"] == 3 and summary["rate"] == 20
    # Nothing local: no ports, no workers of its own.
    assert (summary["ports"], summary["workers"], summary["workers_alive"]) == (None,) * 3
    assert summary["requests_sent"] >= 0.9 * 20 * 20
    assert summary["requests_answered"] >= 0.9 * summary["requests_sent"], summary
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
    control, personalized = summary["variants"]["control"], summary["variants"]["personalized"]
    assert control["requests"] > 50 and personalized["requests"] > 50, summary["variants"]
    assert control["clicks"] > 0 and personalized["clicks"] > 0
    assert summary["incidents"] == []


@pytest.mark.e2e
def test_sigterm_stops_the_traffic_and_prints_the_summary(
    broker: Broker, redis_server, start_worker, topic_prefix: str, tmp_path: Path
) -> None:
    """What `docker stop` does to the compose file's simulator; the topic prefix from the
    environment, as compose passes it."""
    start_worker(control_share="0.5")
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = _simulate(
            *f"--broker kafka://{broker.bootstrap} --json --rate 20".split(),
            stdout=out,
            stderr=err,
            env=_fresh_env(STREAMRANK_TOPIC_PREFIX=topic_prefix),
        )
    try:
        _wait_for_text(stderr, f"topic prefix {topic_prefix!r}", proc, timeout=30)
        time.sleep(8.0)  # connected, catalog sent, traffic flowing
        assert proc.poll() is None, stderr.read_text()
        proc.send_signal(signal.SIGTERM)
        summary = _finish(proc, stdout, stderr, timeout=60, rc=128 + signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()

    assert summary["stopped_by"] == "SIGTERM"
    assert summary["prefix"] == topic_prefix and summary["broker"] == broker.bootstrap
    assert summary["requests_answered"] > 0
