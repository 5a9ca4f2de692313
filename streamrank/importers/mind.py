"""MIND (``behaviors.tsv``, ``news.tsv``): each news item becomes a catalog event
(category ``category/subcategory``); each impression becomes a search request
whose candidates are the shown items in the logged order, with no retrieval
score; each clicked item becomes a click tied to the request, one second after
it. A user's history (clicks before the log starts) becomes clicks one minute
before the user's first impression, once per user. Positions are left out: the
logged order of a MIND impression is not the order it was shown in.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from streamrank.importers.text import Event, open_text


def _mind_time(text: str) -> float:
    moment = datetime.strptime(text, "%m/%d/%Y %I:%M:%S %p").replace(tzinfo=UTC)
    return moment.timestamp()


def import_mind(source: Path) -> Iterator[Event]:
    """Events from a MIND folder holding ``behaviors.tsv`` and ``news.tsv`` (or ``.gz``)."""
    # Sorted by time, stably: a history a minute before an impression can precede the
    # clicks of another user's impression a few seconds earlier.
    yield from sorted(_mind_events(source), key=lambda event: event["ts"])


def _mind_events(source: Path) -> Iterator[Event]:
    impressions = []
    with open_text(source / "behaviors.tsv") as behaviors:
        for line in behaviors:
            impression_id, user_id, time_text, history, shown = line.rstrip("\n").split("\t")
            impressions.append((_mind_time(time_text), impression_id, user_id, history, shown))
    impressions.sort()
    if not impressions:
        return
    first_ts = impressions[0][0]

    news_path = source / "news.tsv"
    if news_path.exists() or news_path.with_name("news.tsv.gz").exists():
        with open_text(news_path) as news:
            for line in news:
                fields = line.rstrip("\n").split("\t")
                yield {
                    "stream": "catalog",
                    "item_id": fields[0],
                    "category": f"{fields[1]}/{fields[2]}",
                    "title": fields[3][:200],
                    "ts": first_ts - 3600.0,
                }

    users_seen: set[str] = set()
    for ts, impression_id, user_id, history, shown in impressions:
        if user_id not in users_seen:
            users_seen.add(user_id)
            for n, item_id in enumerate(dict.fromkeys(history.split())):
                yield {
                    "stream": "interactions",
                    "event_id": f"h-{user_id}-{n}",
                    "user_id": user_id,
                    "item_id": item_id,
                    "type": "click",
                    "ts": ts - 60.0,
                }
        labelled = [entry.rsplit("-", 1) for entry in shown.split()]
        request_id = f"mind-{impression_id}"
        yield {
            "stream": "search-requests",
            "request_id": request_id,
            "user_id": user_id,
            "candidates": [{"item_id": item_id} for item_id, _ in labelled],
            "ts": ts,
        }
        for item_id, label in labelled:
            if label == "1":
                yield {
                    "stream": "interactions",
                    "event_id": f"c-{impression_id}-{item_id}",
                    "user_id": user_id,
                    "item_id": item_id,
                    "type": "click",
                    "request_id": request_id,
                    "ts": ts + 1.0,
                }
