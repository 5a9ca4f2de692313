"""`streamrank tune` on the MIND fixture: an honest split, a loadable file, a repeatable search."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import orjson
import pytest

from models.profile import RankingProfile
from streamrank.cli import main
from streamrank.evaluation import Judge
from streamrank.importers import import_mind
from streamrank.replay import ReplayOptions, replay
from streamrank.tuning import SEARCH_SPACE, split_requests, tune, tuning_events
from streams.settings import Settings

MIND = Path(__file__).parent / "fixtures" / "mind"
TRIALS = 4


@pytest.fixture(scope="module")
def events() -> list[dict[str, Any]]:
    return list(import_mind(MIND))


@pytest.fixture(scope="module")
def tuned(
    events: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any], bytes]:
    """`streamrank tune` run once: the file it wrote, that file parsed, and its stdout."""
    folder = tmp_path_factory.mktemp("tune")
    log = folder / "mind.jsonl"
    log.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    output = folder / "profile.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["tune", str(log), "--trials", str(TRIALS), "-o", str(output)]) == 0
    return output, orjson.loads(output.read_bytes()), stdout.getvalue().encode()


def test_split_is_by_request_in_time_order(events: list[dict[str, Any]]) -> None:
    split = split_requests(events, holdout=0.3)
    times = {e["request_id"]: e["ts"] for e in events if e["stream"] == "search-requests"}
    assert (len(split.tuning), len(split.held_out)) == (38, 17)
    assert set(split.tuning) | set(split.held_out) == set(times)
    assert max(times[r] for r in split.tuning) <= min(times[r] for r in split.held_out)
    assert split.tuning_ts[1] <= split.held_out_ts[0]

    # A trial sees no held-out request nor any of its clicks, but every tuning click.
    part = tuning_events(events, split)
    held_out = set(split.held_out)
    assert not [e for e in part if e.get("request_id") in held_out]
    tuning_clicks = [e for e in events if e.get("request_id") in set(split.tuning)]
    assert all(e in part for e in tuning_clicks)


def test_split_needs_requests_on_both_sides(events: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match="holdout"):
        split_requests(events, holdout=1.0)
    with pytest.raises(ValueError, match="too few"):
        split_requests(events[:200], holdout=0.001)
    with pytest.raises(ValueError, match="objective"):
        tune(events, trials=1, objective="mrr")


def test_the_file_loads_in_replay_and_workers(
    tuned: tuple[Path, dict[str, Any], bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, document, stdout = tuned
    profile = RankingProfile.from_file(path)
    assert profile.to_dict() == document["profile"]
    assert orjson.loads(stdout) == document
    assert document["trials"] == len(document["history"]) == TRIALS
    assert document["data"] == "mind.jsonl" and document["objective"] == "auc"
    assert document["split"]["tuning_requests"] == 38

    monkeypatch.setenv("STREAMRANK_PROFILE", str(path))
    monkeypatch.delenv("STREAMRANK_RETRIEVAL_WEIGHT", raising=False)
    monkeypatch.delenv("STREAMRANK_ONLINE_LEARNING_RATE", raising=False)
    assert Settings.from_env().profile == profile


def test_held_out_figures_are_those_of_a_plain_replay(
    tuned: tuple[Path, dict[str, Any], bytes], events: list[dict[str, Any]]
) -> None:
    path, document, _ = tuned
    split = split_requests(events, holdout=0.3)
    options = ReplayOptions(RankingProfile.from_file(path))
    judge = Judge(options.window_s)
    replay(events, options, judge=judge)
    report = judge.report(0.0, only=set(split.held_out))
    del report["elapsed_s"]
    assert report == document["held_out"]
    assert report["requests"] == 17


def test_best_is_at_least_the_default_on_the_tuning_part(
    tuned: tuple[Path, dict[str, Any], bytes],
) -> None:
    _, document, _ = tuned
    history = document["history"]
    # The default profile is enqueued as the first trial, so this holds by construction...
    default_profile = RankingProfile().to_dict()
    assert history[0]["params"] == {name: default_profile[name] for name in SEARCH_SPACE}
    best = document["tuning"]["metrics"]["auc"]
    default = document["tuning_default"]["metrics"]["auc"]
    assert best >= default
    # ...and the reports agree with the trials: the full replays' tuning part is exactly
    # what each trial measured on its truncated replay.
    assert history[0]["value"] == default
    assert best == max(t["value"] for t in history if t["state"] == "complete")
    assert document["held_out_default"]["requests"] == document["held_out"]["requests"] == 17


def test_same_seed_same_search(
    events: list[dict[str, Any]], tuned: tuple[Path, dict[str, Any], bytes]
) -> None:
    _, document, _ = tuned
    again = tune(events, trials=TRIALS, seed=0)
    assert again.profile.to_dict() == document["profile"]
    assert [t["params"] for t in again.to_dict()["history"]] == [
        t["params"] for t in document["history"]
    ]
    other = tune(events, trials=2, seed=1, objective="ndcg@10")
    assert other.history[1]["params"] != document["history"][1]["params"]
    assert other.tuning["metrics"]["ndcg@10"] >= other.tuning_default["metrics"]["ndcg@10"]


def test_docstring_example() -> None:
    import doctest

    import streamrank.tuning

    result = doctest.testmod(streamrank.tuning, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
