"""Session click streams (YOOCHOOSE, DIGINETICA): every click becomes a search request.

These logs hold what a shopper clicked (or viewed) in a session, not what was shown,
so the request is synthetic, as in the sampled-metric protocol of session-based
recommendation papers. For each click, in time order:

- a ``search-requests`` event at the click's time, for the session's user, whose
  candidates are the clicked item and ``negatives`` (99) distinct other items drawn
  from the catalog one after another with probability proportional to their click
  count over the whole log, then shuffled; with no retrieval score. The counts are
  known beforehand, so global popularity, future clicks included, leaks into the
  candidate set, as it does in the papers' protocol: a popularity ranking is hard to
  beat here because the negatives are popular too. Draws and shuffle come from one
  NumPy generator seeded with ``seed``: the same log and seed give the same events;
- a click on that item tied to the request, half a millisecond later. There is no
  ``position``: the order of the candidates is synthetic, not what a shopper saw.

Every click is kept, in its session's order. A session's first click is a request
predicted without any session history. Repeated clicks on the same item stay (one
YOOCHOOSE click in five repeats the one before). Sessions of one click stay (a third
of the DIGINETICA sample's sessions; YOOCHOOSE-100k holds none): GRU4Rec-style
evaluations drop them, but that chooses requests by their future, as a session's
length is known only once it ends.

Before the clicks, each item of the log becomes a catalog event one second before the
first click (item id, and category where the file has a ``Category`` column; neither
sample here has one). Within a session, clicks logged in the same millisecond are
moved a millisecond apart, so that each click falls after its request and before the
session's next request.

YOOCHOOSE (RecSys Challenge 2015) as GRU4Rec preprocesses it: tab-separated,
``SessionId ItemId Time`` (epoch seconds) with a header; a folder is read whole,
train files before test files (the order only breaks ties in time). The user is
the session (``s-<session>``). The challenge's raw ``yoochoose-clicks.dat`` (comma
separated, ISO times, no header) is not read.

DIGINETICA (CIKM Cup 2016) item views: ``session_id;user_id;item_id;timeframe;eventdate``.
``timeframe`` is milliseconds since the session started and ``eventdate`` the day of
the view, with no time of day; an event's time is midnight UTC of the session's first
day plus its timeframe, so that a session over midnight keeps its order and sessions
of the same day overlap in their first minutes. A view is a click. The user is the
session's first known ``user_id`` (``u-<user>``; shoppers log in mid-session), else
the session (``s-<session>``).

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp())
>>> _ = (folder / "clicks.txt").write_text(
...     "SessionId\\tItemId\\tTime\\n1\\t7\\t100.0\\n1\\t9\\t160.0\\n2\\t8\\t130.0\\n"
... )
>>> events = list(import_yoochoose(folder, negatives=1))
>>> [(e["stream"], e["ts"]) for e in events][2:5]
[('catalog', 99.0), ('search-requests', 100.0), ('interactions', 100.0005)]
>>> request, click = events[3:5]
>>> request["request_id"], request["user_id"], len(request["candidates"])
('yc-1-1', 's-1', 2)
>>> click["event_id"], click["item_id"], click["request_id"], "position" in click
('yc-1-1-click', '7', 'yc-1-1', False)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from streamrank.importers.text import Event, open_text

CLICK_DELAY_S = 0.0005  # after its request; half the logs' resolution (1 ms)
TIE_STEP_S = 0.001  # between clicks of a session logged in the same millisecond
CATALOG_LEAD_S = 1.0  # catalog events come this long before the first click
CHUNK = 1024  # requests whose candidates are drawn at once (part of what a seed gives)


class _Click(NamedTuple):
    session: str
    user: str
    item: str
    ts: float
    category: str | None = None


def import_yoochoose(source: Path, *, negatives: int = 99, seed: int = 0) -> Iterator[Event]:
    """Events from YOOCHOOSE clicks: a folder of ``*.txt`` (or ``.txt.gz``) files, or one file."""
    clicks: list[_Click] = []
    for path in _files(source, ".txt"):
        with open_text(path) as lines:
            header = next(lines, "").rstrip("\n").split("\t")
            column = {name: n for n, name in enumerate(header)}
            session, item, ts = column["SessionId"], column["ItemId"], column["Time"]
            category = column.get("Category")
            for line in lines:
                if not line.strip():
                    continue
                fields = line.rstrip("\n").split("\t")
                clicks.append(
                    _Click(
                        session=fields[session],
                        user=f"s-{fields[session]}",
                        item=fields[item],
                        ts=float(fields[ts]),
                        category=fields[category] if category is not None else None,
                    )
                )
    yield from _session_events(clicks, "yc", negatives, seed)


def import_diginetica(source: Path, *, negatives: int = 99, seed: int = 0) -> Iterator[Event]:
    """Events from DIGINETICA item views: a folder of ``*.csv`` (or ``.csv.gz``), or one file."""
    views: dict[str, list[tuple[str, str, int, str]]] = {}
    for path in _files(source, ".csv"):
        with open_text(path) as lines:
            header = next(lines, "").rstrip("\n").split(";")
            column = {name: n for n, name in enumerate(header)}
            session, user = column["session_id"], column["user_id"]
            item, timeframe, day = column["item_id"], column["timeframe"], column["eventdate"]
            for line in lines:
                if not line.strip():
                    continue
                fields = line.rstrip("\n").split(";")
                views.setdefault(fields[session], []).append(
                    (fields[user], fields[item], int(fields[timeframe]), fields[day])
                )
    clicks = []
    for session, rows in views.items():
        rows.sort(key=lambda row: row[2])
        start = datetime.combine(date.fromisoformat(min(row[3] for row in rows)), time(), UTC)
        users = [row[0] for row in rows if row[0] not in ("", "NA")]
        user = f"u-{users[0]}" if users else f"s-{session}"
        for _, item, timeframe, _ in rows:
            clicks.append(_Click(session, user, item, start.timestamp() + timeframe / 1000))
    yield from _session_events(clicks, "dg", negatives, seed)


def _files(source: Path, suffix: str) -> list[Path]:
    """The log's files: ``source`` itself, or the folder's ``*suffix[.gz]``, train before test."""
    if source.is_file():
        return [source]
    paths = [
        path
        for path in source.iterdir()
        if path.name.endswith(suffix)
        # name and name.gz hold the same log (``open_text`` reads either): read it once
        or (path.name.endswith(suffix + ".gz") and not path.with_suffix("").exists())
    ]
    if not paths:
        raise FileNotFoundError(f"no *{suffix} or *{suffix}.gz file in {source}")
    return sorted(paths, key=lambda path: ("test" in path.name, path.name))


def _session_events(
    clicks: Iterable[_Click], prefix: str, negatives: int, seed: int
) -> Iterator[Event]:
    """The protocol of the module docstring over clicks in the log's order."""
    if negatives < 0:
        raise ValueError(f"negatives must be 0 or more, not {negatives}")
    sessions: dict[str, list[_Click]] = {}
    for click in clicks:
        sessions.setdefault(click.session, []).append(click)
    # (ts, n, click): the n-th click of its session, ties within a session a millisecond apart
    timeline: list[tuple[float, int, _Click]] = []
    for session_clicks in sessions.values():
        session_clicks.sort(key=lambda click: click.ts)
        last = float("-inf")
        for n, click in enumerate(session_clicks, start=1):
            last = round(max(click.ts, last + TIE_STEP_S), 3)
            timeline.append((last, n, click))
    if not timeline:
        return
    timeline.sort(key=lambda entry: entry[0])  # stable: sessions' ties keep the log's order

    index: dict[str, int] = {}
    categories: dict[str, str] = {}
    for _, _, click in timeline:
        index.setdefault(click.item, len(index))
        if click.category:
            categories.setdefault(click.item, click.category)
    items = list(index)
    counts = np.bincount([index[click.item] for _, _, click in timeline], minlength=len(items))
    rng = np.random.default_rng(seed)
    sampler = _PopularitySampler(counts, rng)

    catalog_ts = timeline[0][0] - CATALOG_LEAD_S
    for item in items:
        event: Event = {"stream": "catalog", "item_id": item, "ts": catalog_ts}
        if item in categories:
            event["category"] = categories[item]
        yield event

    # A click follows its request by a fixed delay, so clicks come due in request order.
    pending: deque[Event] = deque()
    for begin in range(0, len(timeline), CHUNK):
        chunk = timeline[begin : begin + CHUNK]
        clicked = np.array([index[click.item] for _, _, click in chunk], dtype=np.intp)
        shown = np.concatenate((clicked[:, None], sampler.draw(clicked, negatives)), axis=1)
        shown = rng.permuted(shown, axis=1).tolist()
        for (ts, n, click), candidates in zip(chunk, shown, strict=True):
            while pending and pending[0]["ts"] <= ts:
                yield pending.popleft()
            request_id = f"{prefix}-{click.session}-{n}"
            yield {
                "stream": "search-requests",
                "request_id": request_id,
                "user_id": click.user,
                "candidates": [{"item_id": items[i]} for i in candidates],
                "ts": ts,
            }
            pending.append(
                {
                    "stream": "interactions",
                    "event_id": f"{request_id}-click",
                    "user_id": click.user,
                    "item_id": click.item,
                    "type": "click",
                    "request_id": request_id,
                    "ts": round(ts + CLICK_DELAY_S, 4),
                }
            )
    yield from pending


class _PopularitySampler:
    """Distinct items drawn one after another with probability proportional to a count.

    Draws with replacement, keeping each item's first draw and dropping the excluded
    item, follow exactly that law. They are drawn for many requests at once, so a
    request costs a share of a few vectorized calls, not a pass over the catalog; the
    rare request whose batch holds too few distinct items draws on alone.
    """

    def __init__(self, counts: np.ndarray, rng: np.random.Generator) -> None:
        self._p = counts / counts.sum()
        # Each item once per click: a uniform index into it draws an item by its count,
        # a lookup where a search in the CDF took ten times as long.
        self._clicks = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        self._rng = rng

    def draw(self, exclude: np.ndarray, size: int) -> np.ndarray:
        """For each item of ``exclude``, ``size`` distinct others (all others if fewer): a row."""
        n, rows = len(self._p), len(exclude)
        if size >= n - 1:
            everything = np.broadcast_to(np.arange(n), (rows, n))
            return everything[everything != exclude[:, None]].reshape(rows, n - 1)
        draws = self._draws((rows, 2 * size + 8))
        # each row's first draw of each item, the excluded item left out, in draw order
        order = np.argsort(draws, axis=1, kind="stable")
        ranked = np.take_along_axis(draws, order, axis=1)
        first = np.ones_like(draws, dtype=bool)
        first[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
        keep = np.empty_like(first)
        np.put_along_axis(keep, order, first, axis=1)
        keep &= draws != exclude[:, None]
        kept = np.cumsum(keep, axis=1)
        short = kept[:, -1] < size
        keep &= kept <= size
        result = np.empty((rows, size), dtype=draws.dtype)
        result[~short] = draws[~short][keep[~short]].reshape(-1, size)
        for row in np.flatnonzero(short):
            result[row] = self._draw_on(draws[row], int(exclude[row]), size)
        return result

    def _draws(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._clicks[self._rng.integers(0, len(self._clicks), shape)]

    def _draw_on(self, draws: np.ndarray, exclude: int, size: int) -> np.ndarray:
        """``size`` distinct items for one request, going on from its first ``draws``."""
        for _ in range(4):
            _, first = np.unique(draws, return_index=True)
            distinct = draws[np.sort(first)]
            distinct = distinct[distinct != exclude]
            if len(distinct) >= size:
                return distinct[:size]
            draws = np.concatenate((draws, self._draws((len(draws),))))
        # What is left is rare items: draw the rest among them, with the same law.
        p = self._p.copy()
        p[distinct] = 0.0
        p[exclude] = 0.0
        rest = self._rng.choice(len(p), size - len(distinct), replace=False, p=p / p.sum())
        return np.concatenate((distinct, rest))
