"""Open Bandit Dataset (ZOZOTOWN): the logged slates, clicks and propensities of a bandit
policy as search requests over the whole item set.

An OBD policy folder (``random/`` or ``bts/``) holds the log (``all.csv``, or
``men.csv`` / ``women.csv`` for the other campaigns, plain or ``.gz``) and
``item_context.csv``. Each log row is one shown slot: ``timestamp, item_id, position
(1-3, left to right), click, propensity_score`` (the logging policy's probability of
that item at that position), the hashed ``user_feature_0..3`` and
``user-item_affinity_0..79`` (past clicks of the user on each item); the first column
is an unnamed row index.

The events:

- a ``catalog`` event per item, an hour before the log: ``category`` is the hashed
  ``item_feature_1`` (12 values in the ``all`` campaign), ``brand`` the hashed
  ``item_feature_2`` (21 values). ``item_feature_0`` is a standardized number with
  negative values, not a price, so no price is given; ``item_feature_3`` is left out.
- a ``search-requests`` event per impression whose candidates are all the items in id
  order (the set the policy chose from; no retrieval score, as there was no search),
  with ``query`` empty and ``context = {"obd": {...}}``: ``policy`` (the folder name),
  ``user_features`` (the four hashes), ``affinity`` (item id -> score, non-zero only)
  and ``shown``, the logged slate: ``[{"item_id", "position", "propensity", "row"}]``
  in position order. The context carries what an off-policy evaluation needs; the
  ranker does not read it. Clicks are not in it.
- an ``interactions`` click per clicked row, a second after its request, with the
  request id and the logged ``position``.

OBD gives no user id, only hashed user features: the user id is a digest of the four
``user_feature`` hashes, so per-user state groups shoppers by feature profile (240 of
them in the random sample), not by person.

An impression's three slots are logged as rows with timestamps up to a few
milliseconds apart: in ``random/all.csv`` 113 pairs of consecutive rows of the same user
profile lie within 0.1 s of each other, all at different positions, while pairs further
apart are at different positions only two times in three, as chance would have it. So
consecutive rows of one user profile (features and affinities) within ``gap_s`` of the
impression's first row, at positions not yet taken, form one impression. The public
sample keeps a small share of the full log's rows, so most impressions have one row.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from streamrank.importers.text import Event, open_text

DEFAULT_POLICY = "random"
CAMPAIGNS = ("all", "men", "women")


def import_obd(source: Path, gap_s: float = 0.1) -> Iterator[Event]:
    """Events from an OBD policy folder (or the dataset folder, meaning its ``random/``)."""
    folder = policy_folder(source)
    with open_text(folder / "item_context.csv") as items_file:
        items = list(csv.DictReader(items_file))
    items.sort(key=lambda row: int(row["item_id"]))
    impressions = list(_impressions(log_file(folder), gap_s))
    if not impressions:
        return
    first_ts = impressions[0][0]["ts"]
    for item in items:
        yield {
            "stream": "catalog",
            "item_id": item["item_id"],
            "category": item["item_feature_1"],
            "brand": item["item_feature_2"],
            "ts": first_ts - 3600.0,
        }
    candidates = [{"item_id": item["item_id"]} for item in items]
    policy = folder.name
    # Time order, stably: a click a second after its request may follow the next request.
    events = []
    for rows in impressions:
        events += _impression_events(rows, candidates, policy)
    events.sort(key=lambda event: event["ts"])
    yield from events


def policy_folder(source: Path) -> Path:
    """The policy folder itself, or ``random/`` inside the dataset folder."""
    if (source / DEFAULT_POLICY).is_dir() and not (source / "item_context.csv").exists():
        return source / DEFAULT_POLICY
    return source


def log_file(folder: Path) -> Path:
    """The campaign log in a policy folder: ``all.csv`` first, plain or gzip-compressed."""
    for campaign in CAMPAIGNS:
        for name in (f"{campaign}.csv", f"{campaign}.csv.gz"):
            if (folder / name).exists():
                return folder / name
    raise FileNotFoundError(f"no OBD log ({', '.join(CAMPAIGNS)}.csv) in {folder}")


def _row(raw: dict[str, str]) -> dict:
    user_features = [raw[f"user_feature_{i}"] for i in range(4)]
    affinity = {
        name.rsplit("_", 1)[1]: float(value)
        for name, value in raw.items()
        if name.startswith("user-item_affinity_") and float(value) != 0.0
    }
    return {
        "row": int(raw[""]),
        "ts": datetime.fromisoformat(raw["timestamp"]).timestamp(),
        "item_id": raw["item_id"],
        "position": int(raw["position"]),
        "click": raw["click"] == "1",
        "propensity": float(raw["propensity_score"]),
        "user_features": user_features,
        "affinity": affinity,
    }


def _impressions(path: Path, gap_s: float) -> Iterator[list[dict]]:
    """Rows grouped into impressions: same profile, within ``gap_s``, distinct positions."""
    with open_text(path) as log:
        rows = sorted((_row(raw) for raw in csv.DictReader(log)), key=lambda row: row["ts"])
    current: list[dict] = []
    for row in rows:
        if (
            current
            and row["ts"] - current[0]["ts"] <= gap_s
            and row["user_features"] == current[0]["user_features"]
            and row["affinity"] == current[0]["affinity"]
            and all(row["position"] != other["position"] for other in current)
        ):
            current.append(row)
            continue
        if current:
            yield current
        current = [row]
    if current:
        yield current


def user_id(user_features: list[str]) -> str:
    """A stable id for a user feature profile (OBD has no user ids)."""
    digest = hashlib.blake2b("|".join(user_features).encode(), digest_size=8).hexdigest()
    return f"obd-u-{digest}"


def _impression_events(rows: list[dict], candidates: list[dict], policy: str) -> list[Event]:
    first = rows[0]
    request_id = f"obd-{policy}-{first['row']}"
    user = user_id(first["user_features"])
    shown = sorted(rows, key=lambda row: row["position"])
    events: list[Event] = [
        {
            "stream": "search-requests",
            "request_id": request_id,
            "user_id": user,
            "candidates": candidates,
            "ts": first["ts"],
            "context": {
                "obd": {
                    "policy": policy,
                    "user_features": first["user_features"],
                    "affinity": first["affinity"],
                    "shown": [
                        {
                            "item_id": row["item_id"],
                            "position": row["position"],
                            "propensity": row["propensity"],
                            "row": row["row"],
                        }
                        for row in shown
                    ],
                }
            },
        }
    ]
    for row in shown:
        if row["click"]:
            events.append(
                {
                    "stream": "interactions",
                    "event_id": f"obd-{policy}-{row['row']}-click",
                    "user_id": user,
                    "item_id": row["item_id"],
                    "type": "click",
                    "request_id": request_id,
                    "position": row["position"],
                    "ts": first["ts"] + 1.0,
                }
            )
    return events
