"""Configuration of a worker, read from the environment in this one place.

Every variable is optional; the README lists them all.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from typing import Any

from models.profile import RankingProfile

KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
ROLES = ("all", "serve", "learn")
# Redis socket timeout of the interactions and learner processes. A commit of a thousand
# interactions is one script that can keep a loaded Redis busy for a good part of a second;
# the ranking's 0.25 s would call that an outage and retry (bench/streaming.py's throughput
# phase saw it). Nobody waits on these processes for an answer.
BACKGROUND_REDIS_TIMEOUT_S = 2.0


def _env(name: str, default: str) -> str:
    # Empty counts as unset: compose files pass `${VAR:-}` through as an empty string.
    return os.environ.get(name) or default


@dataclass(frozen=True)
class Settings:
    broker: str = "kafka://127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    app_id: str = "streamrank"
    topic_prefix: str = ""
    partitions: int = 4
    replication_factor: int = 1
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
    # The tuned knobs (blend, online learner, diversity): STREAMRANK_PROFILE names a file
    # written by `streamrank tune`; STREAMRANK_RETRIEVAL_WEIGHT, STREAMRANK_ONLINE_LEARNING_RATE,
    # STREAMRANK_DEEP_WEIGHT and STREAMRANK_DIVERSITY, when set, override it.
    profile: RankingProfile = field(default_factory=RankingProfile)
    control_share: float = 0.0
    experiment_salt: str = "streamrank"
    # A JSON file of experiments (engine.experiment_config), reloaded when it changes; empty:
    # the default experiment, control against personalized by control_share and the salt.
    experiments_path: str = ""
    impression_window_s: int = 1800
    # Ranked positions remembered and counted as shown, and labelled when a window closes.
    impression_depth: int = 20
    impression_close_depth: int = 10
    # For replaying a log through Kafka (`streamrank replay --via-kafka`): the shopper saw
    # the logged order, not ours.
    logged_order_shown: bool = False
    # Seconds shared item state may be served from the worker's near cache (see RankingConfig).
    shared_state_max_age_s: float = 5.0
    log_format: str = "text"
    # What this worker runs: "all" (every agent: one process is a whole deployment),
    # "serve" (ranking, feedback, catalog) or "learn" (the online learner alone, in its own
    # consumer group), so that learning does not take CPU from the rankers.
    role: str = "all"
    online_warmup_examples: int = 500
    # The deep CTR model: the learning worker trains a candidate every `train_interval_s`
    # seconds (0: never) on the newest `train_window` labelled examples, once it holds at
    # least `train_min_examples`; serving workers follow the registry's serving version.
    train_interval_s: float = 300.0
    train_window: int = 50_000
    train_min_examples: int = 2_000
    train_epochs: int = 2
    # Kafka security: the worker's consumers and producers (Faust) and the admin client that
    # creates the topics all use these.
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = field(default="", repr=False)
    kafka_ssl_cafile: str = ""  # empty: the system's CA bundle
    kafka_ssl_certfile: str = ""  # client certificate (mutual TLS), PEM
    kafka_ssl_keyfile: str = ""  # its private key, PEM (empty: in the certificate file)
    kafka_ssl_key_password: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"STREAMRANK_ROLE={self.role!r}: expected one of {', '.join(ROLES)}")
        if self.train_interval_s < 0 or self.train_window < 10 or self.train_epochs < 1:
            raise ValueError(
                "STREAMRANK_TRAIN_INTERVAL must be >= 0, STREAMRANK_TRAIN_WINDOW >= 10 and "
                "STREAMRANK_TRAIN_EPOCHS >= 1"
            )
        if self.kafka_security_protocol not in KAFKA_SECURITY_PROTOCOLS:
            raise ValueError(
                f"STREAMRANK_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol!r}: "
                f"expected one of {', '.join(KAFKA_SECURITY_PROTOCOLS)}"
            )
        if self.kafka_sasl_mechanism not in KAFKA_SASL_MECHANISMS:
            raise ValueError(
                f"STREAMRANK_KAFKA_SASL_MECHANISM={self.kafka_sasl_mechanism!r}: "
                f"expected one of {', '.join(KAFKA_SASL_MECHANISMS)}"
            )
        if self.kafka_security_protocol.startswith("SASL_") and not self.kafka_sasl_username:
            raise ValueError(
                f"STREAMRANK_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                "STREAMRANK_KAFKA_SASL_USERNAME and STREAMRANK_KAFKA_SASL_PASSWORD"
            )

    @classmethod
    def from_env(cls) -> Settings:
        profile_path = os.environ.get("STREAMRANK_PROFILE")
        profile = RankingProfile.from_file(profile_path) if profile_path else RankingProfile()
        overrides = {
            "retrieval_weight": os.environ.get("STREAMRANK_RETRIEVAL_WEIGHT"),
            "online_learning_rate": os.environ.get("STREAMRANK_ONLINE_LEARNING_RATE"),
            "deep_weight": os.environ.get("STREAMRANK_DEEP_WEIGHT"),
            "diversity": os.environ.get("STREAMRANK_DIVERSITY"),
        }
        profile = RankingProfile.from_dict(
            profile.to_dict() | {k: float(v) for k, v in overrides.items() if v}
        )
        return cls(
            broker=_env("STREAMRANK_BROKER", cls.broker),
            redis_url=_env("STREAMRANK_REDIS_URL", cls.redis_url),
            app_id=_env("STREAMRANK_APP_ID", cls.app_id),
            topic_prefix=_env("STREAMRANK_TOPIC_PREFIX", cls.topic_prefix),
            partitions=int(_env("STREAMRANK_PARTITIONS", str(cls.partitions))),
            replication_factor=int(
                _env("STREAMRANK_REPLICATION_FACTOR", str(cls.replication_factor))
            ),
            web_port=int(_env("STREAMRANK_WEB_PORT", str(cls.web_port))),
            web_bind=_env("STREAMRANK_WEB_BIND", cls.web_bind),
            datadir=_env("STREAMRANK_DATADIR", cls.datadir),
            fetch_max_wait_ms=int(_env("STREAMRANK_FETCH_MAX_WAIT_MS", str(cls.fetch_max_wait_ms))),
            broker_session_timeout_s=float(
                _env("STREAMRANK_BROKER_SESSION_TIMEOUT", str(cls.broker_session_timeout_s))
            ),
            max_candidates=int(_env("STREAMRANK_MAX_CANDIDATES", str(cls.max_candidates))),
            max_message_bytes=int(_env("STREAMRANK_MAX_MESSAGE_BYTES", str(cls.max_message_bytes))),
            profile=profile,
            control_share=float(_env("STREAMRANK_CONTROL_SHARE", str(cls.control_share))),
            experiment_salt=_env("STREAMRANK_EXPERIMENT_SALT", cls.experiment_salt),
            experiments_path=_env("STREAMRANK_EXPERIMENTS", ""),
            impression_window_s=int(
                _env("STREAMRANK_IMPRESSION_WINDOW", str(cls.impression_window_s))
            ),
            impression_depth=int(_env("STREAMRANK_IMPRESSION_DEPTH", str(cls.impression_depth))),
            impression_close_depth=int(
                _env("STREAMRANK_IMPRESSION_CLOSE_DEPTH", str(cls.impression_close_depth))
            ),
            logged_order_shown=_env("STREAMRANK_LOGGED_ORDER_SHOWN", "0").lower()
            in ("1", "true", "yes"),
            shared_state_max_age_s=float(
                _env("STREAMRANK_SHARED_STATE_MAX_AGE", str(cls.shared_state_max_age_s))
            ),
            log_format=_env("STREAMRANK_LOG_FORMAT", cls.log_format),
            role=_env("STREAMRANK_ROLE", cls.role).lower(),
            online_warmup_examples=int(
                _env("STREAMRANK_ONLINE_WARMUP", str(cls.online_warmup_examples))
            ),
            train_interval_s=float(_env("STREAMRANK_TRAIN_INTERVAL", str(cls.train_interval_s))),
            train_window=int(_env("STREAMRANK_TRAIN_WINDOW", str(cls.train_window))),
            train_min_examples=int(
                _env("STREAMRANK_TRAIN_MIN_EXAMPLES", str(cls.train_min_examples))
            ),
            train_epochs=int(_env("STREAMRANK_TRAIN_EPOCHS", str(cls.train_epochs))),
            kafka_security_protocol=_env(
                "STREAMRANK_KAFKA_SECURITY_PROTOCOL", cls.kafka_security_protocol
            ).upper(),
            kafka_sasl_mechanism=_env(
                "STREAMRANK_KAFKA_SASL_MECHANISM", cls.kafka_sasl_mechanism
            ).upper(),
            kafka_sasl_username=_env("STREAMRANK_KAFKA_SASL_USERNAME", ""),
            kafka_sasl_password=_env("STREAMRANK_KAFKA_SASL_PASSWORD", ""),
            kafka_ssl_cafile=_env("STREAMRANK_KAFKA_SSL_CAFILE", ""),
            kafka_ssl_certfile=_env("STREAMRANK_KAFKA_SSL_CERTFILE", ""),
            kafka_ssl_keyfile=_env("STREAMRANK_KAFKA_SSL_KEYFILE", ""),
            kafka_ssl_key_password=_env("STREAMRANK_KAFKA_SSL_KEY_PASSWORD", ""),
        )

    def kafka_ssl_context(self) -> ssl.SSLContext | None:
        """TLS for the broker connections, or None when the protocol has no SSL."""
        if self.kafka_security_protocol not in ("SSL", "SASL_SSL"):
            return None
        context = ssl.create_default_context(cafile=self.kafka_ssl_cafile or None)
        if self.kafka_ssl_certfile:
            context.load_cert_chain(
                self.kafka_ssl_certfile,
                keyfile=self.kafka_ssl_keyfile or None,
                password=self.kafka_ssl_key_password or None,
            )
        return context

    def kafka_auth(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka clients (admin, producer, consumer) to match."""
        auth: dict[str, Any] = {
            "security_protocol": self.kafka_security_protocol,
            "ssl_context": self.kafka_ssl_context(),
        }
        if self.kafka_security_protocol.startswith("SASL_"):
            auth.update(
                sasl_mechanism=self.kafka_sasl_mechanism,
                sasl_plain_username=self.kafka_sasl_username,
                sasl_plain_password=self.kafka_sasl_password,
            )
        return auth

    @property
    def serves(self) -> bool:
        return self.role in ("all", "serve")

    @property
    def learns(self) -> bool:
        return self.role in ("all", "learn")

    @property
    def group_id(self) -> str:
        """The consumer group: a separate learner must not share the rankers' partitions."""
        return f"{self.app_id}-learner" if self.role == "learn" else self.app_id

    def topic(self, name: str) -> str:
        """A topic's full name: the prefix isolates tenants and test runs."""
        return self.topic_prefix + name
