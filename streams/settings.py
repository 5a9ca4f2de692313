"""Configuration of a worker, read from the environment in this one place.

Every variable is optional; the README lists them all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class Settings:
    broker: str = "kafka://127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    app_id: str = "streamrank"
    topic_prefix: str = ""
    partitions: int = 4
    web_port: int = 6066
    web_bind: str = "127.0.0.1"
    datadir: str = "./.streamrank"
    # Apache Kafka answers a long poll as soon as data arrives, so Faust's fixed 1500 ms is
    # harmless there; the embedded broker (tansu) holds the poll for its full length, so the
    # local stack sets a few milliseconds to keep requests from waiting in the broker.
    fetch_max_wait_ms: int = 500
    broker_session_timeout_s: float = 30.0
    max_candidates: int = 1000
    max_message_bytes: int = 1_000_000
    retrieval_weight: float = 0.01
    control_share: float = 0.0
    experiment_salt: str = "streamrank"
    impression_window_s: int = 1800
    log_format: str = "text"
    online_learning_rate: float = 0.05
    online_warmup_examples: int = 500

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            broker=_env("STREAMRANK_BROKER", cls.broker),
            redis_url=_env("STREAMRANK_REDIS_URL", cls.redis_url),
            app_id=_env("STREAMRANK_APP_ID", cls.app_id),
            topic_prefix=_env("STREAMRANK_TOPIC_PREFIX", cls.topic_prefix),
            partitions=int(_env("STREAMRANK_PARTITIONS", str(cls.partitions))),
            web_port=int(_env("STREAMRANK_WEB_PORT", str(cls.web_port))),
            web_bind=_env("STREAMRANK_WEB_BIND", cls.web_bind),
            datadir=_env("STREAMRANK_DATADIR", cls.datadir),
            fetch_max_wait_ms=int(_env("STREAMRANK_FETCH_MAX_WAIT_MS", str(cls.fetch_max_wait_ms))),
            broker_session_timeout_s=float(
                _env("STREAMRANK_BROKER_SESSION_TIMEOUT", str(cls.broker_session_timeout_s))
            ),
            max_candidates=int(_env("STREAMRANK_MAX_CANDIDATES", str(cls.max_candidates))),
            max_message_bytes=int(_env("STREAMRANK_MAX_MESSAGE_BYTES", str(cls.max_message_bytes))),
            retrieval_weight=float(_env("STREAMRANK_RETRIEVAL_WEIGHT", str(cls.retrieval_weight))),
            control_share=float(_env("STREAMRANK_CONTROL_SHARE", str(cls.control_share))),
            experiment_salt=_env("STREAMRANK_EXPERIMENT_SALT", cls.experiment_salt),
            impression_window_s=int(
                _env("STREAMRANK_IMPRESSION_WINDOW", str(cls.impression_window_s))
            ),
            log_format=_env("STREAMRANK_LOG_FORMAT", cls.log_format),
            online_learning_rate=float(
                _env("STREAMRANK_ONLINE_LEARNING_RATE", str(cls.online_learning_rate))
            ),
            online_warmup_examples=int(
                _env("STREAMRANK_ONLINE_WARMUP", str(cls.online_warmup_examples))
            ),
        )

    def topic(self, name: str) -> str:
        """A topic's full name: the prefix isolates tenants and test runs."""
        return self.topic_prefix + name
