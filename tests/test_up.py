"""``streamrank up``: the whole stack with simulated shoppers, run as a user runs it.

The end-to-end tests start the command as a subprocess from the repository root, in an
environment without any ``STREAMRANK_*`` variable, read the JSON summary it prints, and
check through psutil that none of the processes it started outlives it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import psutil
import pytest

from streamrank.live_view import Metrics, Tally, lift, separated
from streamrank.up import add_arguments

REPO_ROOT = Path(__file__).resolve().parent.parent


# --- quick checks ------------------------------------------------------------------------------


def test_flags_and_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.workers, args.duration, args.json, args.rate, args.control_share) == (
        1,
        None,
        False,
        30.0,
        0.5,
    )
    flags = "--workers 2 --duration 5 --json --seed 3 --rate 10 --broker-port 1 --redis-port 2"
    args = parser.parse_args([*flags.split(), "--web-port", "3", "--prefix", "x-", "--quiet"])
    assert (args.workers, args.duration, args.seed, args.web_port, args.prefix) == (
        2,
        5.0,
        3,
        3,
        "x-",
    )
    assert args.train_interval == 60.0
    assert parser.parse_args(["--train-interval", "0"]).train_interval == 0.0
    bad_flags = (["--workers", "0"], ["--control-share", "1.5"], ["--duration", "-1"])
    for bad in (*bad_flags, ["--train-interval", "-5"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def _tally(clicks_per_request: list[int]) -> Tally:
    tally = Tally()
    for clicks in clicks_per_request:
        tally.requests += 1
        tally.clicks += clicks
        tally.clicks_squared += clicks * clicks
    return tally


def test_ctr_interval_and_lift() -> None:
    control = _tally([0, 1, 2, 1] * 100)  # mean 1, sd ~0.71
    personalized = _tally([1, 2, 2, 1] * 100)  # mean 1.5
    low, high = control.ci95()
    assert low < 1.0 < high and high - low == pytest.approx(2 * 1.96 * 0.7080 / 20, rel=1e-3)
    relative, interval = lift(control, personalized)
    assert relative == pytest.approx(0.5)
    assert 0.3 < interval[0] < 0.5 < interval[1]
    assert separated(control, personalized) and not separated(personalized, control)


def test_lift_becomes_clear_once_intervals_stay_apart() -> None:
    metrics = Metrics(started=0.0)
    for second in range(1, 31):
        better = second > 10  # personalized pulls ahead after ten seconds
        for n in range(30):
            variant = "personalized" if n % 2 else "control"
            clicks = 2 if (variant == "personalized" and better) else n % 3
            metrics.feedback(variant, [{"type": "click"}] * clicks, now=second)
            metrics.requests_answered += 1
        metrics.tick(float(second))
    clear = metrics.clear_after()
    assert clear is not None and 10 < clear["s"] <= 30 and clear["requests"] > 300


# --- end to end --------------------------------------------------------------------------------


def _fresh_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMRANK_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Up:
    """``streamrank up`` as a subprocess: its stderr read as it comes, its children tracked."""

    def __init__(self, *flags: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamrank.cli", "up", *flags],
            cwd=REPO_ROOT,
            env=_fresh_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.stderr: list[str] = []
        self.stdout = b""
        self.children: dict[int, psutil.Process] = {}
        self.commands: dict[int, str] = {}  # read while they run: a dead process has none
        self._readers = [
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._read_stdout, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line.decode(errors="replace"))

    def _read_stdout(self) -> None:
        self.stdout = self.proc.stdout.read()

    def track_children(self) -> None:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            self.children.setdefault(child.pid, child)
            # Again each time: a child caught between fork and exec shows its parent's.
            with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                command = " ".join(child.cmdline())
                if command:  # an exiting process may briefly report an empty command line
                    self.commands[child.pid] = command

    def wait_for_stderr(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.stderr):
            assert self.proc.poll() is None, "".join(self.stderr)
            assert time.monotonic() < deadline, f"no {text!r} in:\n{''.join(self.stderr)}"
            self.track_children()
            time.sleep(0.2)

    def finish(self, timeout: float, returncode: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"streamrank up did not finish:\n{''.join(self.stderr)}")
            self.track_children()
            time.sleep(0.2)
        for reader in self._readers:
            reader.join(10)
        assert self.proc.returncode == returncode, "".join(self.stderr)
        return orjson.loads(self.stdout)

    def survivors(self) -> list[psutil.Process]:
        alive = []
        for child in self.children.values():
            try:
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
            except psutil.NoSuchProcess:
                pass
        return alive

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for child in self.survivors():
            child.kill()


def _started_processes(up: Up) -> set[str]:
    names = ("tansu", "redis-server", "faust")
    return {name for command in up.commands.values() for name in names if name in command}


@pytest.mark.e2e
def test_up_shows_personalized_beating_control_and_leaves_nothing_behind() -> None:
    up = Up("--duration", "60", "--json", "--seed", "1")
    try:
        up.wait_for_stderr("topics", timeout=120)
        summary = up.finish(timeout=150)
        survivors = up.survivors()
    finally:
        up.kill()

    assert _started_processes(up) == {"tansu", "redis-server", "faust"}
    assert survivors == [], survivors
    assert summary["stopped_by"] == "duration" and summary["duration_s"] >= 59
    # Traffic flowed: about 30 requests a second, nearly all answered.
    assert summary["requests_sent"] > 1200
    assert summary["requests_answered"] >= 0.9 * summary["requests_sent"]
    assert summary["requests_per_s"] > 20
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
    # A learned model was served, and it beat the retrieval order clearly.
    assert summary["model_version"] != "online:0"
    control, personalized = summary["variants"]["control"], summary["variants"]["personalized"]
    assert control["requests"] > 300 and personalized["requests"] > 300
    assert personalized["ctr"] > control["ctr"]
    assert summary["lift"] > 0 and summary["lift_ci95"][0] > 0, summary
    assert summary["incidents"] == []
    assert set(summary["ports"]) == {"broker", "redis", "web"}
    # The summary ends with the workers' experiment report, read from Redis.
    (experiment,) = summary["experiments"]["experiments"]
    assert experiment["name"] == "default" and list(summary)[-1] == "experiments"
    counted = experiment["variants"]
    assert counted["control"]["requests"] > 300 and counted["personalized"]["requests"] > 300
    assert counted["personalized"]["ctr"] > counted["control"]["ctr"]
    (comparison,) = experiment["comparisons"]
    low, high = comparison["fixed_horizon"]["lift_ci"]
    assert comparison["variant"] == "personalized" and low <= comparison["fixed_horizon"]["lift"]
    assert comparison["sequential"]["verdict"] in ("personalized better", "no decision yet")
    assert experiment["srm"]["flagged"] is False, experiment["srm"]


@pytest.mark.e2e
def test_requests_keep_being_answered_when_a_worker_dies() -> None:
    up = Up("--workers", "2", "--duration", "45", "--json", "--seed", "2")
    try:
        up.wait_for_stderr("topics", timeout=150)
        time.sleep(8.0)  # traffic flows through both workers
        up.track_children()
        workers = [
            child
            for pid, child in up.children.items()
            if child.is_running() and "faust" in up.commands[pid]
        ]
        assert len(workers) == 2
        workers[0].kill()
        summary = up.finish(timeout=150)
        survivors = up.survivors()
    finally:
        up.kill()

    assert survivors == [], survivors
    assert summary["workers"] == 2 and summary["workers_alive"] == 1
    (incident,) = summary["incidents"]
    assert "exited" in incident["what"]
    died_at = incident["t"]
    assert summary["requests_answered"] >= 0.9 * summary["requests_sent"], summary
    # After the rebalance (the group notices the dead member within its 6 s session
    # timeout), the survivor answers everything that comes in.
    after = [b for b in summary["timeline"] if b["t"] - 5 >= died_at + 15]
    assert len(after) >= 3, summary["timeline"]
    sent = sum(b["sent"] for b in after)
    assert sum(b["answered"] for b in after) >= 0.9 * sent > 0, summary["timeline"]
    assert summary["requests_unanswered"] <= 0.05 * summary["requests_sent"]


@pytest.mark.e2e
@pytest.mark.parametrize("interrupts", [1, 2])
def test_ctrl_c_stops_everything_and_prints_the_summary(interrupts: int) -> None:
    """Once: the traffic stops, the summary is printed, the children stop gracefully.
    Twice: the same without waiting. Either way nothing is left behind."""
    up = Up("--json", "--seed", "4")
    try:
        up.wait_for_stderr("topics", timeout=120)
        time.sleep(4.0)
        up.track_children()
        for _ in range(interrupts):
            up.proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
        summary = up.finish(timeout=60, returncode=128 + signal.SIGINT)
        survivors = up.survivors()
    finally:
        up.kill()

    assert _started_processes(up) == {"tansu", "redis-server", "faust"}
    assert survivors == [], survivors
    assert summary["stopped_by"] == "SIGINT"
    assert summary["requests_answered"] > 0
