"""The MIND importer, on a committed slice of the real data and on hand-made logs."""

from __future__ import annotations

import gzip
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from engine.messages import parse_catalog_item, parse_interaction, parse_search_request
from streamrank.importers import IMPORTERS, import_mind

MIND = Path(__file__).parent / "fixtures" / "mind"


def utc(text: str) -> float:
    return datetime.strptime(text, "%m/%d/%Y %I:%M:%S %p").replace(tzinfo=UTC).timestamp()


def read_behaviors(path: Path) -> list[tuple[str, str, float, list[str], list[tuple[str, str]]]]:
    """(impression id, user, ts, history, [(item, label)]) per line, read independently."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        impression_id, user_id, time_text, history, shown = line.split("\t")
        labelled = [tuple(entry.split("-")) for entry in shown.split()]
        rows.append((impression_id, user_id, utc(time_text), history.split(), labelled))
    return rows


@pytest.fixture(scope="module")
def events() -> list[dict]:
    return list(import_mind(MIND))


@pytest.fixture(scope="module")
def behaviors() -> list[tuple[str, str, float, list[str], list[tuple[str, str]]]]:
    return read_behaviors(MIND / "behaviors.tsv")


def test_fixture_is_a_small_real_slice(behaviors: list) -> None:
    assert (MIND / "behaviors.tsv").stat().st_size + (MIND / "news.tsv").stat().st_size < 110_000
    assert len(behaviors) == 55
    assert sum(label == "1" for *_, shown in behaviors for _, label in shown) >= 55
    assert IMPORTERS["mind"] is import_mind


def test_events_are_in_time_order(events: list[dict]) -> None:
    assert events
    stamps = [event["ts"] for event in events]
    assert stamps == sorted(stamps)
    assert Counter(event["stream"] for event in events).keys() == {
        "catalog",
        "search-requests",
        "interactions",
    }


def test_every_event_parses_as_its_stream(events: list[dict]) -> None:
    parsers = {
        "catalog": parse_catalog_item,
        "search-requests": parse_search_request,
        "interactions": parse_interaction,
    }
    for event in events:
        raw = orjson.dumps({k: v for k, v in event.items() if k != "stream"})
        parsers[event["stream"]](raw)


def test_event_ids_are_unique(events: list[dict]) -> None:
    ids = [event["event_id"] for event in events if event["stream"] == "interactions"]
    assert len(ids) == len(set(ids)) > 0
    requests = [event["request_id"] for event in events if event["stream"] == "search-requests"]
    assert len(requests) == len(set(requests))


def test_catalog_events_come_first_with_category_and_subcategory(
    events: list[dict], behaviors: list
) -> None:
    news = [line.split("\t") for line in (MIND / "news.tsv").read_text("utf-8").splitlines()]
    catalog = [event for event in events if event["stream"] == "catalog"]
    assert len(catalog) == len(news) == 105
    assert all(event["stream"] == "catalog" for event in events[: len(catalog)])
    first_impression = min(ts for _, _, ts, _, _ in behaviors)
    by_item = {event["item_id"]: event for event in catalog}
    for item_id, category, subcategory, title, *_ in news:
        event = by_item[item_id]
        assert event["category"] == f"{category}/{subcategory}"
        assert event["title"] == title[:200]
        assert event["ts"] == first_impression - 3600.0
    # spot check against the raw file
    assert by_item["N37646"]["category"] == "foodanddrink/newstrends"


def test_one_request_per_impression_in_logged_order(events: list[dict], behaviors: list) -> None:
    requests = {
        event["request_id"]: event for event in events if event["stream"] == "search-requests"
    }
    assert len(requests) == len(behaviors)
    for impression_id, user_id, ts, _, shown in behaviors:
        request = requests[f"mind-{impression_id}"]
        assert request["user_id"] == user_id
        assert request["ts"] == ts
        assert [c["item_id"] for c in request["candidates"]] == [item for item, _ in shown]
        # no positions (the logged order is not the order shown), no retrieval score
        assert all(set(c) == {"item_id"} for c in request["candidates"])
        assert "position" not in request and "k" not in request
    assert not any("position" in event for event in events)


def test_time_is_read_as_utc(events: list[dict]) -> None:
    request = next(e for e in events if e.get("request_id") == "mind-58376")
    # "11/12/2019 2:14:46 PM" in the first line of behaviors.tsv
    assert request["ts"] == datetime(2019, 11, 12, 14, 14, 46, tzinfo=UTC).timestamp()


def test_clicks_are_tied_to_their_request_a_second_later(
    events: list[dict], behaviors: list
) -> None:
    tied = [e for e in events if e["stream"] == "interactions" and "request_id" in e]
    expected = {
        (f"mind-{impression_id}", user_id, item, ts + 1.0)
        for impression_id, user_id, ts, _, shown in behaviors
        for item, label in shown
        if label == "1"
    }
    assert len(tied) == len(expected) >= len(behaviors)
    assert {(e["request_id"], e["user_id"], e["item_id"], e["ts"]) for e in tied} == expected
    assert all(e["type"] == "click" for e in tied)
    # each click comes after its request in the log
    index = {e["request_id"]: n for n, e in enumerate(events) if e["stream"] == "search-requests"}
    for n, event in enumerate(events):
        if event["stream"] == "interactions" and "request_id" in event:
            assert index[event["request_id"]] < n


def test_history_clicks_once_per_user_before_the_first_impression(
    events: list[dict], behaviors: list
) -> None:
    first_seen: dict[str, float] = {}
    history: dict[str, list[str]] = {}
    for _, user_id, ts, items, _ in sorted(behaviors, key=lambda row: row[2]):
        if user_id not in first_seen:
            first_seen[user_id] = ts
            history[user_id] = list(dict.fromkeys(items))
    untied = [e for e in events if e["stream"] == "interactions" and "request_id" not in e]
    assert len(untied) == sum(len(items) for items in history.values())
    by_user: dict[str, list[dict]] = {}
    for event in untied:
        by_user.setdefault(event["user_id"], []).append(event)
    for user_id, clicks in by_user.items():
        assert [c["item_id"] for c in clicks] == history[user_id]
        assert all(c["type"] == "click" for c in clicks)
        assert all(c["ts"] == first_seen[user_id] - 60.0 for c in clicks)
    # the first line's history repeats N138: it is clicked once
    assert [c["item_id"] for c in by_user["U81994"]].count("N138") == 1


def write_mind(folder: Path, behaviors: str, news: str | None = None, gz: bool = False) -> Path:
    folder.mkdir()
    files = {"behaviors.tsv": behaviors} | ({"news.tsv": news} if news is not None else {})
    for name, text in files.items():
        if gz:
            with gzip.open(folder / f"{name}.gz", "wt", encoding="utf-8") as out:
                out.write(text)
        else:
            (folder / name).write_text(text, encoding="utf-8")
    return folder


HAND_MADE = (
    "1\tU1\t11/13/2019 8:00:00 AM\tN1 N2 N1\tN3-0 N4-1 N5-1\n"
    "2\tU2\t11/13/2019 7:59:30 AM\t\tN4-0 N3-1\n"
    "3\tU1\t11/13/2019 12:05:00 PM\tN1 N2 N1 N7\tN5-0 N6-1\n"
    "4\tU3\t11/13/2019 12:00:10 AM\tN9\tN6-0 N5-0\n"
)


@pytest.mark.parametrize("gz", [False, True])
def test_hand_made_log(tmp_path: Path, gz: bool) -> None:
    news = "N3\tsports\tsoccer\tA title\tabstract\turl\t[]\t[]\n"
    source = write_mind(tmp_path / "mind", HAND_MADE, news, gz=gz)
    events = list(import_mind(source))
    t8 = utc("11/13/2019 8:00:00 AM")
    t759 = utc("11/13/2019 7:59:30 AM")
    noon = utc("11/13/2019 12:05:00 PM")
    midnight = utc("11/13/2019 12:00:10 AM")
    assert midnight == datetime(2019, 11, 13, 0, 0, 10, tzinfo=UTC).timestamp()
    summary = [
        (e["stream"][0], e.get("event_id") or e.get("request_id") or e["item_id"], e["ts"])
        for e in events
    ]
    assert summary == [
        ("c", "N3", midnight - 3600.0),
        ("i", "h-U3-0", midnight - 60.0),
        ("s", "mind-4", midnight),
        # U1's history a minute before its first impression: before U2's earlier impression
        ("i", "h-U1-0", t8 - 60.0),
        ("i", "h-U1-1", t8 - 60.0),
        ("s", "mind-2", t759),
        ("i", "c-2-N3", t759 + 1.0),
        ("s", "mind-1", t8),
        ("i", "c-1-N4", t8 + 1.0),
        ("i", "c-1-N5", t8 + 1.0),
        # U1 again: no history this time (N7 is never clicked as history)
        ("s", "mind-3", noon),
        ("i", "c-3-N6", noon + 1.0),
    ]
    by_id = {s[1]: e for s, e in zip(summary, events, strict=True)}
    assert [by_id["h-U1-0"]["item_id"], by_id["h-U1-1"]["item_id"]] == ["N1", "N2"]
    assert by_id["mind-1"]["candidates"] == [
        {"item_id": "N3"},
        {"item_id": "N4"},
        {"item_id": "N5"},
    ]
    assert by_id["c-1-N5"]["request_id"] == "mind-1" and by_id["c-1-N5"]["user_id"] == "U1"
    assert by_id["N3"]["category"] == "sports/soccer"
    assert "request_id" not in by_id["h-U3-0"]


def test_without_news_there_are_no_catalog_events(tmp_path: Path) -> None:
    events = list(import_mind(write_mind(tmp_path / "mind", HAND_MADE)))
    assert len(events) == 11
    assert not any(event["stream"] == "catalog" for event in events)


def test_empty_behaviors(tmp_path: Path) -> None:
    assert list(import_mind(write_mind(tmp_path / "mind", "", "N3\ta\tb\tt\t\t\t\t\n"))) == []
