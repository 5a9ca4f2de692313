"""docker/: the worker image and the compose files, checked without a Docker engine.

`docker-compose config` validates and resolves a compose file offline (Debian's
`docker-compose` 1.29 package; scripts/test.sh installs it when it can). The compose tests
skip when it is missing; the Dockerfile tests only read files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
EXTERNAL = DOCKER / "compose.external.yml"
ENV_EXAMPLE = DOCKER / ".env.example"

#: Variables that compose interpolates: a developer's shell must not change what is tested.
_ENV_PREFIXES = ("STREAMRANK_", "COMPOSE_", "KAFKA_", "REDIS_", "PROMETHEUS_", "SIMULATOR_")

needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose is not on PATH (Debian: apt-get install docker-compose; "
    "scripts/test.sh installs it when run as root)",
)


def _compose(
    compose_file: Path, env_file: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """`docker-compose --env-file ENV -f FILE config`; ENV is empty unless given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
    clean.update(env)
    with tempfile.TemporaryDirectory() as scratch:
        # An explicit env file, so that a developer's docker/.env does not leak in either.
        if env_file is None:
            env_file = Path(scratch, "empty.env")
            env_file.write_text("")
        argv = ["docker-compose", "--env-file", str(env_file), "-f", str(compose_file), "config"]
        return subprocess.run(
            argv, cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60, check=False
        )


@cache
def _yaml_to_json_command() -> tuple[str, ...] | None:
    """A command that reads YAML on stdin and writes JSON, or None.

    PyYAML is not a dependency of the project, but Debian's docker-compose is a Python
    program that needs it: its interpreter can parse for us.
    """
    script = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    candidates: list[list[str]] = []
    try:
        import yaml  # noqa: F401
    except ImportError:
        pass
    else:
        import sys

        candidates.append([sys.executable])
    compose = shutil.which("docker-compose")
    if compose:
        with open(compose, "rb") as program:
            first = program.readline(200)
        if first.startswith(b"#!"):
            candidates.append(shlex.split(first[2:].decode(errors="replace")))
    for interpreter in candidates:
        command = (*interpreter, "-c", script)
        try:
            probe = subprocess.run(
                command, input="{}", capture_output=True, text=True, timeout=30, check=False
            )
        except OSError:
            continue
        if probe.returncode == 0:
            return command
    return None


def _parse_yaml(text: str) -> Any:
    command = _yaml_to_json_command()
    if command is None:
        pytest.skip("no YAML parser: neither PyYAML here nor a Python docker-compose")
    done = subprocess.run(
        command, input=text, capture_output=True, text=True, timeout=30, check=True
    )
    return json.loads(done.stdout)


@cache
def _resolved(compose_file: Path, env_file: Path | None = None) -> dict[str, Any]:
    done = _compose(compose_file, env_file)
    assert done.returncode == 0, f"docker-compose config failed:\n{done.stderr}"
    return _parse_yaml(done.stdout)


def _stack() -> dict[str, Any]:
    return _resolved(COMPOSE)


def _workers(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in config["services"].items() if name.startswith("worker")}


def _replicas(service: dict[str, Any]) -> int:
    return int((service.get("deploy") or {}).get("replicas", service.get("scale", 1)))


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """{target: source} of each volume; short and long syntax."""
    mounts = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts[volume["target"]] = volume.get("source", "")
        else:
            source, target = str(volume).split(":")[:2]
            mounts[target] = source
    return mounts


def _port_bindings(service: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(host ip, published port) of each published port; short and long syntax."""
    bindings: list[tuple[str | None, str]] = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):  # Compose v2: long syntax
            if port.get("published"):
                bindings.append((port.get("host_ip"), str(port["published"])))
            continue
        parts = str(port).split("/")[0].split(":")
        if len(parts) == 3:
            bindings.append((parts[0], parts[1]))
        elif len(parts) == 2:
            bindings.append((None, parts[0]))
        else:  # a container port only: published on a random port of every interface
            bindings.append((None, "random"))
    return bindings


# --- docker/compose.yml -------------------------------------------------------------------


@needs_compose
def test_compose_file_validates_with_the_whole_stack() -> None:
    services = _stack()["services"]
    assert {"kafka", "redis", "simulator", "prometheus"} <= set(services)
    workers = _workers(_stack())
    assert workers, "no worker service"
    assert sum(_replicas(w) for w in workers.values()) >= 2, "fewer than two workers"


@needs_compose
def test_kafka_is_the_official_image_in_kraft_mode() -> None:
    kafka = _stack()["services"]["kafka"]
    image, _, tag = kafka["image"].partition(":")
    assert image in ("apache/kafka", "docker.io/apache/kafka")
    assert re.fullmatch(r"[34]\.\d+\.\d+", tag), f"pin a 3.x or 4.x release, not {tag!r}"
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "zookeeper" not in json.dumps(env).lower()
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    # A single node: internal topics cannot have more replicas than brokers.
    assert str(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == "1"
    assert any("kafka-" in part for part in kafka["healthcheck"]["test"])


@needs_compose
def test_redis_persists_to_a_named_volume() -> None:
    config = _stack()
    redis = config["services"]["redis"]
    assert re.fullmatch(r"(docker\.io/)?redis:7(\.\d+)*(-[a-z0-9.]+)?", redis["image"])
    command = _command(redis)
    assert command[command.index("--appendonly") + 1] == "yes"
    assert _mounts(redis).get("/data") in config.get("volumes", {}), "/data: no named volume"
    assert "redis-cli" in redis["healthcheck"]["test"]


@needs_compose
def test_every_service_has_a_health_check() -> None:
    for name, service in _stack()["services"].items():
        check = service.get("healthcheck") or {}
        test = check.get("test")
        assert test and not check.get("disable") and test != ["NONE"], f"{name}: no health check"


@needs_compose
def test_workers_use_the_compose_kafka_and_redis() -> None:
    for name, worker in _workers(_stack()).items():
        env = worker["environment"]
        assert env["STREAMRANK_BROKER"] == "kafka://kafka:9092", name
        assert env["STREAMRANK_REDIS_URL"].startswith("redis://redis:6379"), name
        # Prometheus and the health check reach the web server over the compose network.
        assert env["STREAMRANK_WEB_BIND"] == "0.0.0.0", name
        assert worker["build"]["dockerfile"] in ("docker/Dockerfile", str(DOCKER / "Dockerfile"))
        assert Path(worker["build"]["context"]).resolve() == ROOT
        assert _command(worker)[:4] == ["faust", "-A", "streams.app", "worker"]
        for dependency in ("kafka", "redis"):
            assert worker["depends_on"][dependency]["condition"] == "service_healthy", name
        health = " ".join(worker["healthcheck"]["test"])
        assert "/health" in health and "6066" in health, name


@needs_compose
def test_simulator_drives_the_broker() -> None:
    simulator = _stack()["services"]["simulator"]
    command = _command(simulator)
    assert command[:2] == ["streamrank", "simulate"]
    assert command[command.index("--broker") + 1] == "kafka:9092"
    assert float(command[command.index("--rate") + 1]) > 0
    # The workers create the topics it produces to.
    worker_names = set(_workers(_stack()))
    assert worker_names & set(simulator.get("depends_on") or {})


@needs_compose
def test_published_ports_are_bound_to_localhost() -> None:
    published = 0
    for name, service in _stack()["services"].items():
        for host_ip, port in _port_bindings(service):
            assert host_ip == "127.0.0.1", f"{name} publishes {port} on every interface"
            published += 1
    assert published, "nothing published (Prometheus at least should be)"


@needs_compose
def test_prometheus_scrapes_every_worker() -> None:
    config = _stack()
    prometheus = config["services"]["prometheus"]
    image, _, tag = prometheus["image"].partition(":")
    assert image.endswith("prom/prometheus") and re.fullmatch(r"v\d+\.\d+\.\d+", tag)
    mounted = _mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    assert Path(mounted) == DOCKER / "prometheus.yml"

    scrape = _parse_yaml((DOCKER / "prometheus.yml").read_text())["scrape_configs"]
    targets: set[str] = set()
    for job in scrape:
        if job.get("metrics_path", "/metrics") != "/metrics":
            continue
        for sd in job.get("dns_sd_configs") or []:
            targets |= {f"{n}:{sd['port']}" for n in sd["names"]}
        for static in job.get("static_configs") or []:
            targets |= set(static["targets"])
    workers = _workers(config)
    for name in workers:
        # DNS service discovery of the service name finds every replica.
        assert f"{name}:6066" in targets, f"Prometheus does not scrape {name}"


# --- docker/compose.external.yml: workers against an existing Kafka and Redis -------------


@needs_compose
def test_external_compose_passes_the_example_settings_through() -> None:
    config = _resolved(EXTERNAL, ENV_EXAMPLE)
    assert not {"kafka", "redis"} & set(config["services"]), "bundles its own Kafka or Redis"
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    workers = _workers(config)
    assert sum(_replicas(w) for w in workers.values()) >= 2
    for name, worker in workers.items():
        env = worker["environment"]
        assert not worker.get("depends_on"), name
        for key in (
            "STREAMRANK_BROKER",
            "STREAMRANK_REDIS_URL",
            "STREAMRANK_KAFKA_SECURITY_PROTOCOL",
            "STREAMRANK_KAFKA_SASL_MECHANISM",
            "STREAMRANK_KAFKA_SASL_USERNAME",
            "STREAMRANK_KAFKA_SASL_PASSWORD",
            "STREAMRANK_KAFKA_SSL_CAFILE",
        ):
            assert env[key] == example[key], (name, key)
        for key in ("STREAMRANK_KAFKA_SSL_CERTFILE", "STREAMRANK_KAFKA_SSL_KEYFILE"):
            assert key in env, (name, key)
        assert "/etc/streamrank/secrets" in _mounts(worker), name
    assert "prometheus" in config["services"]


@needs_compose
def test_external_compose_refuses_to_start_without_a_broker() -> None:
    done = _compose(EXTERNAL)
    assert done.returncode != 0
    assert "STREAMRANK_BROKER" in done.stderr


# --- docker/Dockerfile --------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DOCKER / "Dockerfile").read_text()
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    result = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            result.append((instruction.upper(), arguments.strip()))
    return result


def test_dockerfile_pins_the_cpu_build_of_torch() -> None:
    runs = [args for instruction, args in _dockerfile_instructions() if instruction == "RUN"]
    torch_installs = [r for r in runs if re.search(r"\btorch==", r)]
    assert torch_installs, "torch is not installed explicitly"
    assert all("torch==2.13.0" in r for r in torch_installs)
    assert all("download.pytorch.org/whl/cpu" in r for r in torch_installs)
    # The same pin as the project's, so the two move together.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "torch==2.13.0" in pyproject["project"]["dependencies"]


def test_dockerfile_runs_the_worker_as_a_non_root_user() -> None:
    instructions = _dockerfile_instructions()
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users, "no USER: the worker would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"runs as {users[-1]}"
    cmd = [args for instruction, args in instructions if instruction == "CMD"][-1]
    assert json.loads(cmd)[:4] == ["faust", "-A", "streams.app", "worker"]
    assert any(instruction == "HEALTHCHECK" for instruction, _ in instructions)


def test_dockerignore_keeps_what_the_image_copies() -> None:
    """docker/Dockerfile.dockerignore excludes everything (.venv above all) but the sources."""
    patterns = [
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    kept = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = []
    for instruction, args in _dockerfile_instructions():
        if instruction == "COPY" and "--from" not in args:
            copied += [s.rstrip("/") for s in args.split()[:-1] if not s.startswith("--")]
    assert copied and set(copied) <= kept, f"copied but ignored: {set(copied) - kept}"
