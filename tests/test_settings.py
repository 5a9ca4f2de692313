"""Worker configuration from the environment, including Kafka security pass-through."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import faust
import orjson
import pytest

from models.profile import RankingProfile
from streams.settings import Settings


def settings(monkeypatch: pytest.MonkeyPatch, **variables: str) -> Settings:
    for name in list(os.environ):
        if name.startswith("STREAMRANK_"):
            monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(f"STREAMRANK_{name}", value)
    return Settings.from_env()


def test_defaults_follow_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(monkeypatch)
    assert s.broker == "kafka://127.0.0.1:9092"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert (s.app_id, s.topic_prefix, s.partitions, s.web_port) == ("streamrank", "", 4, 6066)
    assert s.web_bind == "127.0.0.1"
    assert s.datadir == "./.streamrank"
    assert s.kafka_auth() == {"security_protocol": "PLAINTEXT", "ssl_context": None}


def test_a_tuned_profile_configures_the_models_and_variables_win(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tuned = tmp_path / "profile.json"
    tuned.write_bytes(
        orjson.dumps({"profile": {"online_learning_rate": 0.2, "retrieval_weight": 0.3}})
    )
    s = settings(monkeypatch, PROFILE=str(tuned))
    assert (s.profile.online_learning_rate, s.profile.retrieval_weight) == (0.2, 0.3)
    assert s.profile.learner_options()["learning_rate"] == 0.2
    s = settings(monkeypatch, PROFILE=str(tuned), RETRIEVAL_WEIGHT="0.05")
    assert (s.profile.online_learning_rate, s.profile.retrieval_weight) == (0.2, 0.05)
    assert settings(monkeypatch).profile == RankingProfile()


def test_a_profile_with_an_unknown_or_bad_knob_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    typo = tmp_path / "typo.json"
    typo.write_bytes(orjson.dumps({"learning_rate": 0.2}))
    with pytest.raises(ValueError, match="unknown profile key 'learning_rate'"):
        settings(monkeypatch, PROFILE=str(typo))
    negative = tmp_path / "negative.json"
    negative.write_bytes(orjson.dumps({"online_l2": -1.0}))
    with pytest.raises(ValueError, match="online_l2"):
        settings(monkeypatch, PROFILE=str(negative))


def test_roles_split_serving_from_learning(monkeypatch: pytest.MonkeyPatch) -> None:
    everything = settings(monkeypatch)
    assert (everything.serves, everything.learns, everything.group_id) == (
        True,
        True,
        "streamrank",
    )
    serve = settings(monkeypatch, ROLE="serve")
    assert (serve.serves, serve.learns, serve.group_id) == (True, False, "streamrank")
    learn = settings(monkeypatch, ROLE="LEARN", APP_ID="shop")
    assert (learn.serves, learn.learns, learn.group_id) == (False, True, "shop-learner")
    with pytest.raises(ValueError, match="STREAMRANK_ROLE='rank'"):
        settings(monkeypatch, ROLE="rank")


def test_variables_override_and_empty_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(
        monkeypatch, PARTITIONS="8", TOPIC_PREFIX="shop-", WEB_PORT="", CONTROL_SHARE="0.5"
    )
    assert (s.partitions, s.topic_prefix, s.web_port, s.control_share) == (8, "shop-", 6066, 0.5)
    assert s.topic("ranked-results") == "shop-ranked-results"


def test_sasl_scram_over_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(
        monkeypatch,
        KAFKA_SECURITY_PROTOCOL="sasl_ssl",
        KAFKA_SASL_MECHANISM="scram-sha-512",
        KAFKA_SASL_USERNAME="ranker",
        KAFKA_SASL_PASSWORD="secret",
    )
    auth = s.kafka_auth()
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("ranker", "secret")
    assert isinstance(auth["ssl_context"], ssl.SSLContext)
    assert "secret" not in repr(s)
    from streams.app import broker_credentials

    credentials = broker_credentials(s)
    assert isinstance(credentials, faust.SASLCredentials)


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "STREAMRANK_KAFKA_SECURITY_PROTOCOL"),
        ({"KAFKA_SASL_MECHANISM": "GSSAPI"}, "STREAMRANK_KAFKA_SASL_MECHANISM"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}, "STREAMRANK_KAFKA_SASL_USERNAME"),
    ],
)
def test_bad_security_settings_are_refused_clearly(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        settings(monkeypatch, **variables)
