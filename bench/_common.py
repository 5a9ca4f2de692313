"""Shared pieces of the benchmarks: a synthetic shop, engagement history, statistics, reports.

Nothing here times anything. The shop is deterministic for a seed: a catalog (categories,
brands, prices), shoppers with favourite categories and a price level, and queries that
retrieve mostly from one category. :func:`build_history` plays ranked requests and the
clicks, add-to-carts and purchases they lead to through the engine (``Ranker.rank`` /
``remember``, ``Feedback.prepare`` / ``commit``) against any store, so that user tastes,
item and query counters and position counts hold realistic, non-trivial values.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from engine.features import FeatureConfig, catalog_writes  # noqa: E402
from engine.feedback import Feedback  # noqa: E402
from engine.messages import (  # noqa: E402
    CatalogItem,
    Interaction,
    SearchRequest,
    parse_search_request,
)
from engine.ranking import Ranker  # noqa: E402
from engine.store import Store  # noqa: E402
from models.online_ctr import LinearCTR  # noqa: E402

# --- the synthetic shop ------------------------------------------------------------------------

_DEPARTMENTS = {
    "shoes": ("running", "trail", "casual", "boots", "sandals"),
    "kitchen": ("coffee", "knives", "pans", "storage", "baking"),
    "garden": ("tools", "seeds", "furniture", "lighting"),
    "electronics": ("audio", "phones", "laptops", "cameras", "cables", "gaming"),
    "sports": ("cycling", "yoga", "camping", "fitness", "swimming"),
}
_QUERY_WORDS = (
    "best",
    "cheap",
    "gift",
    "pro",
    "mini",
    "new",
    "classic",
    "set",
    "for men",
    "for women",
    "sale",
    "premium",
)


@dataclass
class Shop:
    """Items, users and queries of a synthetic shop (all ids are strings of the contract)."""

    items: list[str]
    item_category: dict[str, str]
    item_brand: dict[str, str]
    item_price: dict[str, float]
    item_available: dict[str, bool]
    by_category: dict[str, list[str]]
    users: list[str]
    user_categories: dict[str, list[str]]
    queries: list[str]
    query_category: dict[str, str]
    categories: list[str] = field(default_factory=list)

    def catalog_item(self, item_id: str) -> CatalogItem:
        return CatalogItem(
            item_id=item_id,
            category=self.item_category[item_id],
            brand=self.item_brand[item_id],
            price=self.item_price[item_id],
            title=f"{self.item_brand[item_id]} {self.item_category[item_id]} {item_id}",
            available=self.item_available[item_id],
        )

    def catalog_message(self, item_id: str) -> dict[str, Any]:
        item = self.catalog_item(item_id)
        return {
            "item_id": item.item_id,
            "category": item.category,
            "brand": item.brand,
            "price": item.price,
            "title": item.title,
            "available": item.available,
        }


def make_shop(
    n_items: int = 5000, n_users: int = 1000, n_queries: int = 300, seed: int = 7
) -> Shop:
    rng = random.Random(seed)
    categories = [f"{d}/{s}" for d, subs in _DEPARTMENTS.items() for s in subs]
    # Category sizes follow a mild power law; brands belong to a few categories each.
    weights = [1.0 / (1 + i) ** 0.6 for i in range(len(categories))]
    rng.shuffle(weights)
    brands = [f"brand-{b}" for b in range(max(20, n_items // 30))]
    category_brands = {c: rng.sample(brands, 12) for c in categories}
    category_price = {c: math.exp(rng.uniform(math.log(8), math.log(400))) for c in categories}

    items, item_category, item_brand, item_price, item_available = [], {}, {}, {}, {}
    by_category: dict[str, list[str]] = {c: [] for c in categories}
    for n in range(n_items):
        item_id = f"i-{n}"
        category = rng.choices(categories, weights)[0]
        items.append(item_id)
        item_category[item_id] = category
        item_brand[item_id] = rng.choice(category_brands[category])
        item_price[item_id] = round(category_price[category] * math.exp(rng.gauss(0, 0.5)), 2)
        item_available[item_id] = rng.random() > 0.03
        by_category[category].append(item_id)

    users = [f"u-{n}" for n in range(n_users)]
    user_categories = {u: rng.sample(categories, rng.choice((1, 2, 2, 3))) for u in users}
    queries, query_category = [], {}
    for n in range(n_queries):
        category = rng.choices(categories, weights)[0]
        query = f"{category.split('/')[1]} {rng.choice(_QUERY_WORDS)} {n}"
        queries.append(query)
        query_category[query] = category
    return Shop(
        items,
        item_category,
        item_brand,
        item_price,
        item_available,
        by_category,
        users,
        user_categories,
        queries,
        query_category,
        categories,
    )


def request_body(
    shop: Shop,
    rng: random.Random,
    n_candidates: int,
    request_id: str,
    *,
    user_id: str | None = None,
    pool: list[str] | None = None,
    ts: float | None = None,
) -> dict[str, Any]:
    """A search request as the search layer sends it (contract JSON object).

    Candidates come mostly (70%) from the query's category, the rest from anywhere (or all
    from ``pool`` when given), with decreasing retrieval scores.
    """
    user_id = user_id or rng.choice(shop.users)
    if rng.random() < 0.6:  # shoppers mostly search in categories they like
        category = rng.choice(shop.user_categories[user_id])
        query = rng.choice(
            [q for q in shop.queries if shop.query_category[q] == category] or shop.queries
        )
    else:
        query = rng.choice(shop.queries)
    if pool is not None:
        chosen = rng.sample(pool, min(n_candidates, len(pool)))
    else:
        own = shop.by_category[shop.query_category[query]]
        chosen = rng.sample(own, min(len(own), int(n_candidates * 0.7)))
        seen = set(chosen)
        while len(chosen) < n_candidates:
            item = rng.choice(shop.items)
            if item not in seen:
                seen.add(item)
                chosen.append(item)
    top = rng.uniform(15.0, 30.0)
    candidates = [
        {"item_id": item, "score": round(top - n * rng.uniform(0.02, 0.1), 4)}
        for n, item in enumerate(chosen)
    ]
    body: dict[str, Any] = {
        "request_id": request_id,
        "user_id": user_id,
        "query": query,
        "candidates": candidates,
        "context": {"device": rng.choice(("mobile", "desktop"))},
    }
    if ts is not None:
        body["ts"] = ts
    return body


def parse(body: dict[str, Any]) -> SearchRequest:
    """The engine's view of a request body, through the same parser as the worker."""
    return parse_search_request(orjson.dumps(body))


def simulated_engagement(
    shop: Shop,
    rng: random.Random,
    user_id: str,
    shown: list[str],
    request_id: str | None,
    ts: float,
    next_event: Any,
) -> list[Interaction]:
    """Clicks (position-biased, more likely in the user's categories), then some carts and
    purchases of clicked items; ``next_event()`` gives unique event ids."""
    liked = set(shop.user_categories[user_id])
    events: list[Interaction] = []
    for position, item_id in enumerate(shown[:20], start=1):
        p = 0.25 / position**0.7 * (2.5 if shop.item_category[item_id] in liked else 0.6)
        if rng.random() >= p:
            continue
        ts += rng.uniform(1.0, 30.0)
        events.append(
            Interaction(next_event(), user_id, item_id, "click", ts, request_id, position)
        )
        if rng.random() < 0.25:
            ts += rng.uniform(5.0, 60.0)
            # carts and purchases sometimes carry the request id, sometimes not
            rid = request_id if rng.random() < 0.5 else None
            events.append(Interaction(next_event(), user_id, item_id, "add_to_cart", ts, rid))
            if rng.random() < 0.35:
                ts += rng.uniform(30.0, 600.0)
                events.append(
                    Interaction(
                        next_event(),
                        user_id,
                        item_id,
                        "purchase",
                        ts,
                        None,
                        None,
                        shop.item_price[item_id],
                    )
                )
    return events


@dataclass
class HistoryCounts:
    requests: int = 0
    clicks: int = 0
    carts: int = 0
    purchases: int = 0
    browse_events: int = 0
    seconds: float = 0.0


def write_catalog(shop: Shop, store: Store, batch: int = 200) -> None:
    config = FeatureConfig()
    writes: list = []
    for item_id in shop.items:
        writes += catalog_writes(shop.catalog_item(item_id), config)
        if len(writes) >= batch:
            store.apply(writes)
            writes = []
    if writes:
        store.apply(writes)


def build_history(
    shop: Shop,
    store: Store,
    n_requests: int,
    *,
    seed: int = 11,
    candidates: tuple[int, int] = (20, 60),
    span_s: float = 3 * 86400.0,
    id_prefix: str = "h",
) -> HistoryCounts:
    """Rank ``n_requests`` past requests and apply the engagement they lead to.

    Requests and events are time-stamped over the last ``span_s`` seconds, in order. One
    interaction in ten is a click from outside search (no request id). Uses the engine's
    own code paths, so the state is what a worker would have written.
    """
    rng = random.Random(seed)
    ranker = Ranker(store, LinearCTR.prior())
    feedback = Feedback(store)
    counts = HistoryCounts()
    event_no = 0

    def next_event() -> str:
        nonlocal event_no
        event_no += 1
        return f"{id_prefix}e-{event_no}"

    started = time.perf_counter()
    now = time.time()
    for n in range(n_requests):
        ts = now - span_s + span_s * n / max(1, n_requests)
        body = request_body(shop, rng, rng.randint(*candidates), f"{id_prefix}r-{n}", ts=ts)
        ranking = ranker.rank(parse(body))
        ranker.remember(ranking)
        counts.requests += 1
        shown = [item.item_id for item in ranking.result.items]
        events = simulated_engagement(
            shop, rng, body["user_id"], shown, body["request_id"], ts, next_event
        )
        if rng.random() < 0.3:  # browsing: a click outside search, on a liked category
            user = body["user_id"]
            item = rng.choice(shop.by_category[rng.choice(shop.user_categories[user])])
            events.append(Interaction(next_event(), user, item, "click", ts + 5.0))
            counts.browse_events += 1
        for event in events:
            feedback.commit(feedback.prepare(event))
            if event.type == "click":
                counts.clicks += 1
            elif event.type == "add_to_cart":
                counts.carts += 1
            else:
                counts.purchases += 1
    counts.seconds = time.perf_counter() - started
    return counts


# --- statistics --------------------------------------------------------------------------------


def summarize(values: list[float]) -> dict[str, float]:
    """n, p50, p90, p99, max, mean in ms (nearest-rank percentiles)."""
    if not values:
        return {
            "n": 0.0,
            "p50": math.nan,
            "p90": math.nan,
            "p99": math.nan,
            "max": math.nan,
            "mean": math.nan,
        }
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    return {
        "n": float(len(ordered)),
        "p50": statistics.median(ordered),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


# --- reporting ---------------------------------------------------------------------------------


def code_version() -> str:
    """The commit measured, and whether the code under test had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(REPO_ROOT),
                "status",
                "--porcelain",
                "--",
                "engine",
                "models",
                "streams",
                "streamrank",
                "pyproject.toml",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + (" (+ uncommitted changes in the code under test)" if dirty else "")


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "commit": code_version(),
        "cpu": model,
        "cores": usable,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (/proc/stat)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def process_cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (Linux /proc), NaN if unknown."""
    if pid is None:
        return math.nan
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


class MachineLoad:
    """How busy the whole machine was during a run, and how much of that was not us.

    Other processes (a test suite, another stack) on these 2-core machines distort every
    figure; the report prints this so a disturbed run can be recognized and repeated.
    """

    def __init__(self, pids: dict[str, int | None] | None = None) -> None:
        self.pids = dict(pids or {})
        self.pids.setdefault("benchmark", os.getpid())
        self.start()

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._jiffies = cpu_jiffies()
        self._ours = {name: process_cpu_seconds(pid) for name, pid in self.pids.items()}
        self._load = os.getloadavg()[0]

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._t0
        busy0, total0 = self._jiffies
        busy1, total1 = cpu_jiffies()
        cores = max(1, len(os.sched_getaffinity(0)))
        ticks = os.sysconf("SC_CLK_TCK")
        machine_busy_s = (busy1 - busy0) / ticks
        ours = {
            name: process_cpu_seconds(pid) - self._ours[name] for name, pid in self.pids.items()
        }
        ours_s = sum(v for v in ours.values() if not math.isnan(v))
        return {
            "wall_s": wall,
            "machine_busy_pct_of_all_cores": 100.0 * (busy1 - busy0) / max(1, total1 - total0),
            "other_processes_cores": max(0.0, machine_busy_s - ours_s) / wall if wall else 0.0,
            "loadavg_1m_start": self._load,
            "loadavg_1m_end": os.getloadavg()[0],
            "cores": cores,
            **{f"{name} cpu %": 100.0 * v / wall for name, v in ours.items()},
        }


def load_line(load: dict[str, float]) -> str:
    return (
        f"Machine load during the run: {load['machine_busy_pct_of_all_cores']:.0f}% of "
        f"{load['cores']} cores busy; processes outside this benchmark used "
        f"{load['other_processes_cores']:.2f} cores on average (1-min load average "
        f"{load['loadavg_1m_start']:.2f} at start, {load['loadavg_1m_end']:.2f} at end)"
        + (
            "  ** DISTURBED: other work ran on this machine; repeat on an idle one **"
            if load["other_processes_cores"] > 0.15
            else ""
        )
    )


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "n/a"
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_lines(info: dict[str, Any]) -> str:
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores, "
        f"{info['implementation']} {info['python']} ({info['platform']})\n"
        f"Date: {info['date']}; code: commit {info.get('commit', 'unknown')}"
    )


def run_bench(measure: Callable[[Any], dict], report: Callable[[dict], None], args: Any) -> dict:
    """Measure, print the report and how long the run took, write ``--json`` if asked."""
    started = time.perf_counter()
    results = measure(args)
    report(results)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(f"\n(run took {results['elapsed_s']} s)")
    write_json(args.json, results)
    return results


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return

    def default(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        raise TypeError

    Path(path).write_bytes(
        orjson.dumps(
            payload,
            option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS,
            default=default,
        )
    )
    print(f"JSON written to {path}")
