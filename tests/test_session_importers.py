"""The YOOCHOOSE and DIGINETICA importers, on committed slices of the real logs."""

from __future__ import annotations

import doctest
import gzip
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pytest

import streamrank.importers.sessions as sessions
from engine.messages import parse_catalog_item, parse_interaction, parse_search_request
from streamrank.cli import main
from streamrank.importers import IMPORTERS, import_diginetica, import_yoochoose
from streamrank.replay import replay

FIXTURES = Path(__file__).parent / "fixtures"
YOOCHOOSE = FIXTURES / "yoochoose"
DIGINETICA = FIXTURES / "diginetica"
Importer = Callable[..., Iterator[dict]]


def raw_yoochoose() -> list[tuple[str, str, float]]:
    """(session, item, time) per line of both files, read independently of the importer."""
    rows = []
    for name in ("yoochoose-clicks-100k_train_full.txt", "yoochoose-clicks-100k_test.txt"):
        header, *lines = (YOOCHOOSE / name).read_text(encoding="utf-8").splitlines()
        assert header == "SessionId\tItemId\tTime"
        for line in lines:
            session, item, ts = line.split("\t")
            rows.append((session, item, float(ts)))
    return rows


def raw_diginetica() -> list[tuple[str, str, str, int, str]]:
    """(session, user, item, timeframe, date) per line, read independently of the importer."""
    path = DIGINETICA / "sample_train-item-views.csv"
    header, *lines = path.read_text(encoding="utf-8").splitlines()
    assert header == "session_id;user_id;item_id;timeframe;eventdate"
    rows = []
    for line in lines:
        session, user, item, timeframe, day = line.split(";")
        rows.append((session, user, item, int(timeframe), day))
    return rows


def raw_sessions(log: str) -> dict[str, list[str]]:
    """Each session's clicked items in time order, from the raw file."""
    if log == "yoochoose":
        rows = [(session, ts, item) for session, item, ts in raw_yoochoose()]
    else:
        rows = [(session, float(tf), item) for session, _, item, tf, _ in raw_diginetica()]
    clicks: dict[str, list[tuple[float, str]]] = {}
    for session, ts, item in rows:
        clicks.setdefault(session, []).append((ts, item))
    return {
        session: [item for _, item in sorted(c, key=lambda x: x[0])]
        for session, c in clicks.items()
    }


LOGS = {
    "yoochoose": (import_yoochoose, YOOCHOOSE, "yc"),
    "diginetica": (import_diginetica, DIGINETICA, "dg"),
}


@pytest.fixture(scope="module", params=sorted(LOGS))
def log(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    importer, folder, _ = LOGS[request.param]
    return request.param, list(importer(folder))


def by_stream(events: list[dict], stream: str) -> list[dict]:
    return [event for event in events if event["stream"] == stream]


def test_fixtures_are_small_real_slices() -> None:
    assert len(raw_yoochoose()) == 214 + 112
    assert len(raw_diginetica()) == 378
    for folder in (YOOCHOOSE, DIGINETICA):
        assert sum(path.stat().st_size for path in folder.iterdir()) < 30_000
    assert IMPORTERS["yoochoose"] is import_yoochoose
    assert IMPORTERS["diginetica"] is import_diginetica


def test_events_are_in_time_order(log: tuple[str, list[dict]]) -> None:
    _, events = log
    stamps = [event["ts"] for event in events]
    assert stamps == sorted(stamps)
    assert list(Counter(event["stream"] for event in events)) == [
        "catalog",
        "search-requests",
        "interactions",
    ]


def test_every_event_parses_as_its_stream(log: tuple[str, list[dict]]) -> None:
    parsers = {
        "catalog": parse_catalog_item,
        "search-requests": parse_search_request,
        "interactions": parse_interaction,
    }
    _, events = log
    for event in events:
        parsers[event["stream"]](orjson.dumps({k: v for k, v in event.items() if k != "stream"}))


def test_one_request_and_one_click_per_raw_click(log: tuple[str, list[dict]]) -> None:
    name, events = log
    expected = raw_sessions(name)
    total = sum(len(items) for items in expected.values())
    requests, clicks = by_stream(events, "search-requests"), by_stream(events, "interactions")
    assert len(requests) == len(clicks) == total
    assert len({r["request_id"] for r in requests}) == len({c["event_id"] for c in clicks}) == total
    # each session's clicks, in the log's order, are the raw file's clicks in time order
    seen: dict[str, list[str]] = {}
    prefix = LOGS[name][2]
    for click in clicks:
        _, session, n = click["request_id"].split("-")
        seen.setdefault(session, []).append(click["item_id"])
        assert len(seen[session]) == int(n)
        assert click["request_id"].startswith(f"{prefix}-{session}-")
    assert seen == expected


def test_each_click_follows_its_request_which_holds_it_once(log: tuple[str, list[dict]]) -> None:
    _, events = log
    where = {e["request_id"]: n for n, e in enumerate(events) if e["stream"] == "search-requests"}
    session_next: dict[str, float] = {}
    for n, event in enumerate(events):
        if event["stream"] != "interactions":
            continue
        request = events[where[event["request_id"]]]
        assert where[event["request_id"]] < n
        assert request["ts"] < event["ts"]
        assert [c["item_id"] for c in request["candidates"]].count(event["item_id"]) == 1
        assert event["user_id"] == request["user_id"]
        assert event["type"] == "click" and event["event_id"] == event["request_id"] + "-click"
        assert "position" not in event
    # and the next request of the session comes after the click, strictly
    for event in events:
        if event["stream"] == "interactions":
            session = event["request_id"].rsplit("-", 1)[0]
            session_next[session] = event["ts"]
        elif event["stream"] == "search-requests":
            session = event["request_id"].rsplit("-", 1)[0]
            assert session_next.get(session, float("-inf")) < event["ts"]


def test_candidates_are_distinct_synthetic_and_shuffled(log: tuple[str, list[dict]]) -> None:
    _, events = log
    clicked = {e["request_id"]: e["item_id"] for e in by_stream(events, "interactions")}
    positions = Counter()
    for request in by_stream(events, "search-requests"):
        ids = [c["item_id"] for c in request["candidates"]]
        assert len(ids) == len(set(ids)) == 100
        assert all(set(c) == {"item_id"} for c in request["candidates"])  # no retrieval score
        positions[ids.index(clicked[request["request_id"]])] += 1
    # a uniform position: no place holds much more than its share (1 % of 300-400 requests)
    assert len(positions) > 60
    assert max(positions.values()) < 0.05 * positions.total()


def test_catalog_is_every_item_once_before_the_clicks(log: tuple[str, list[dict]]) -> None:
    name, events = log
    catalog = by_stream(events, "catalog")
    items = {item for session in raw_sessions(name).values() for item in session}
    assert [e["item_id"] for e in catalog] and len(catalog) == len(items)
    assert {e["item_id"] for e in catalog} == items
    assert events[: len(catalog)] == catalog
    first = events[len(catalog)]["ts"]
    assert all(set(e) == {"stream", "item_id", "ts"} for e in catalog)  # no category here
    assert all(e["ts"] == first - 1.0 for e in catalog)


def test_negatives_follow_popularity(log: tuple[str, list[dict]]) -> None:
    name, events = log
    counts = Counter(item for session in raw_sessions(name).values() for item in session)
    shown = Counter(
        c["item_id"] for r in by_stream(events, "search-requests") for c in r["candidates"]
    )
    requests = len(by_stream(events, "search-requests"))
    popular = [shown[i] / requests for i, count in counts.items() if count >= 4]
    rare = [shown[i] / requests for i, count in counts.items() if count == 1]
    assert popular and rare
    assert np.mean(popular) > 2 * np.mean(rare)


@pytest.mark.parametrize("name", sorted(LOGS))
def test_the_seed_decides_the_candidates(name: str) -> None:
    importer, folder, _ = LOGS[name]
    first, again = list(importer(folder)), list(importer(folder, seed=0))
    other = list(importer(folder, seed=1))
    assert first == again
    assert first != other
    # only the candidates' choice and order change
    strip = [{k: v for k, v in e.items() if k != "candidates"} for e in first]
    assert strip == [{k: v for k, v in e.items() if k != "candidates"} for e in other]


@pytest.mark.parametrize("name", sorted(LOGS))
def test_a_small_catalog_is_shown_whole(name: str) -> None:
    importer, folder, _ = LOGS[name]
    events = list(importer(folder, negatives=900))
    catalog = {e["item_id"] for e in by_stream(events, "catalog")}
    for request in by_stream(events, "search-requests"):
        assert {c["item_id"] for c in request["candidates"]} == catalog
        assert len(request["candidates"]) == len(catalog)
    five = by_stream(list(importer(folder, negatives=4)), "search-requests")
    assert {len(r["candidates"]) for r in five} == {5}


def test_yoochoose_users_are_sessions_and_ties_are_a_millisecond_apart() -> None:
    events = list(import_yoochoose(YOOCHOOSE))
    for request in by_stream(events, "search-requests"):
        assert request["user_id"] == "s-" + request["request_id"].split("-")[1]
    # session 14979's two clicks share 1396412628.195 in the raw file
    tied = {
        e["request_id"]: e
        for e in by_stream(events, "search-requests")
        if e["request_id"].startswith("yc-14979-")
    }
    assert tied["yc-14979-1"]["ts"] == 1396412628.195
    assert tied["yc-14979-2"]["ts"] == 1396412628.196
    clicks = {e["event_id"]: e for e in by_stream(events, "interactions")}
    assert clicks["yc-14979-1-click"]["ts"] == 1396412628.1955
    assert clicks["yc-14979-1-click"]["item_id"] == "214819380"  # the file's order
    assert clicks["yc-14979-2-click"]["item_id"] == "214819719"


def test_diginetica_time_is_the_first_day_plus_the_timeframe_and_users_log_in() -> None:
    events = list(import_diginetica(DIGINETICA))
    requests = {e["request_id"]: e for e in by_stream(events, "search-requests")}
    # session 629 starts on 2016-03-20 and goes over midnight: its order holds
    midnight = datetime(2016, 3, 20, tzinfo=UTC).timestamp()
    rows = sorted((tf, item) for s, _, item, tf, _ in raw_diginetica() if s == "629")
    assert {day for s, *_, day in raw_diginetica() if s == "629"} == {"2016-03-20", "2016-03-21"}
    assert [requests[f"dg-629-{n}"]["ts"] for n in range(1, len(rows) + 1)] == [
        round(midnight + tf / 1000, 3) for tf, _ in rows
    ]
    # session 104: a user logs in after the first view; the session is that user throughout
    assert {r["user_id"] for i, r in requests.items() if i.startswith("dg-104-")} == {"u-4"}
    assert requests["dg-1-1"]["user_id"] == "s-1"
    known = {s for s, user, *_ in raw_diginetica() if user != "NA"}
    assert {i.split("-")[1] for i, r in requests.items() if r["user_id"].startswith("u-")} == known


@pytest.mark.parametrize("name", sorted(LOGS))
def test_gzip_and_single_files_give_the_same_events(name: str, tmp_path: Path) -> None:
    importer, folder, _ = LOGS[name]
    expected = list(importer(folder))
    data = sorted(p for p in folder.iterdir() if p.suffix in (".txt", ".csv"))
    for path in data:
        with path.open("rb") as plain, gzip.open(tmp_path / (path.name + ".gz"), "wb") as out:
            shutil.copyfileobj(plain, out)
    shutil.copy(folder / "README.md", tmp_path)
    assert list(importer(tmp_path)) == expected
    if name == "diginetica":
        assert list(importer(data[0])) == expected
        assert list(importer(tmp_path / (data[0].name + ".gz"))) == expected
    else:
        test_only = list(importer(tmp_path / (data[0].name + ".gz")))
        assert len(by_stream(test_only, "interactions")) == 112


def test_an_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(import_yoochoose(tmp_path))
    with pytest.raises(ValueError):
        list(import_yoochoose(YOOCHOOSE, negatives=-1))


def test_a_category_column_reaches_the_catalog(tmp_path: Path) -> None:
    (tmp_path / "clicks.txt").write_text(
        # columns in another order, a click without category, a blank last line
        "SessionId\tTime\tItemId\tCategory\n5\t20.0\t7\tS\n5\t10.0\t8\t\n6\t15.0\t8\t3\n\n",
        encoding="utf-8",
    )
    events = list(import_yoochoose(tmp_path, negatives=5))
    catalog = {e["item_id"]: e for e in by_stream(events, "catalog")}
    assert catalog == {
        "8": {"stream": "catalog", "item_id": "8", "ts": 9.0, "category": "3"},
        "7": {"stream": "catalog", "item_id": "7", "ts": 9.0, "category": "S"},
    }
    order = [(e["stream"][0], e.get("request_id"), e["ts"]) for e in events[2:]]
    assert order == [
        ("s", "yc-5-1", 10.0),
        ("i", "yc-5-1", 10.0005),
        ("s", "yc-6-1", 15.0),
        ("i", "yc-6-1", 15.0005),
        ("s", "yc-5-2", 20.0),
        ("i", "yc-5-2", 20.0005),
    ]


def test_the_sampler_draws_one_after_another_by_count() -> None:
    rng = np.random.default_rng(3)
    sampler = sessions._PopularitySampler(np.array([6, 3, 1, 10]), rng)
    first = sampler.draw(np.full(20_000, 3), 1)[:, 0]
    assert np.allclose(np.bincount(first, minlength=4) / 20_000, [0.6, 0.3, 0.1, 0.0], atol=0.02)
    # the second draw of two, without the first: P(second = 2) = .6*.1/.4 + .3*.1/.7
    second = sampler.draw(np.full(20_000, 3), 2)
    assert (second[:, 0] != second[:, 1]).all()
    assert abs(np.mean(second[:, 1] == 2) - (0.6 * 0.1 / 0.4 + 0.3 * 0.1 / 0.7)) < 0.02


def test_the_sampler_finds_rare_items_when_popular_ones_crowd_the_batch() -> None:
    sampler = sessions._PopularitySampler(
        np.array([10_000, 1, 1, 1, 1, 1]), np.random.default_rng(0)
    )
    drawn = sampler.draw(np.array([0, 1, 5]), 4)
    assert all(len(set(row)) == 4 for row in drawn.tolist())
    assert set(drawn[0]) <= {1, 2, 3, 4, 5}
    assert 1 not in drawn[1] and 5 not in drawn[2]
    assert sampler.draw(np.array([2]), 9).tolist() == [[0, 1, 3, 4, 5]]


def test_the_module_example_runs() -> None:
    result = doctest.testmod(sessions, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_the_cli_writes_the_same_events(tmp_path: Path) -> None:
    for name, (importer, folder, _) in LOGS.items():
        out = tmp_path / f"{name}.jsonl"
        assert main(["import", name, str(folder), "-o", str(out)]) == 0
        lines = out.read_bytes().splitlines()
        assert [orjson.loads(line) for line in lines] == list(importer(folder))


@pytest.mark.parametrize("name", sorted(LOGS))
def test_replay_judges_every_request(name: str) -> None:
    # 10 candidates, not 100: replay costs about 7 ms a request of 100 here
    importer, folder, _ = LOGS[name]
    events = list(importer(folder, negatives=9))
    report = replay(events)
    assert report["requests"] == len(by_stream(events, "search-requests")) > 300
    assert report["requests_with_clicks"] == report["requests"]
    # the input order is shuffled: its reciprocal rank is a random one's, H(10) / 10 = 0.293
    assert 0.22 < report["baselines"]["input_order"]["mrr"] < 0.37
