"""``streamrank experiment report [--json]``: the live experiment report, read from Redis.

Reads what the workers keep (``STREAMRANK_REDIS_URL``, keys under
``STREAMRANK_TOPIC_PREFIX``), computes the statistics of
:mod:`engine.experiment_report`, and prints them as text or JSON. The same report feeds
the worker's ``/experiments`` page.
"""

from __future__ import annotations

import time
from typing import Any

import orjson


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_report(report: dict[str, Any]) -> str:
    """The report as text: a table per experiment, then its tests."""
    lines = []
    for e in report["experiments"]:
        lines.append(
            f"experiment {e['name']} (layer {e['layer']}, primary metric {e['primary_metric']}"
            f"{'' if e['running'] else ', not running'})"
        )
        names = list(e["variants"])
        rows = [
            ("users", "users", 0), ("requests", "requests", 0), ("clicks", "clicks", 0),
            ("ctr", "CTR (clicks/search)", 4), ("ctr_at_k", "CTR@k", 4), ("mrr", "MRR", 4),
            ("add_to_carts", "add-to-carts", 0), ("purchases", "purchases", 0),
            ("revenue_per_request", "revenue/search", 3), ("latency_ms", "latency ms", 3),
        ]  # fmt: skip
        lines.append("| metric | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for key, label, digits in rows:
            cells = []
            for n in names:
                value = e["variants"][n].get(key)
                cells.append(str(value) if digits == 0 else _num(value, digits))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for c in e["comparisons"]:
            f, s = c["fixed_horizon"], c["sequential"]
            low, high = f["difference_ci"]
            lines.append(
                f"{c['variant']} vs {c['control']} on {c['metric']}: difference "
                f"{_num(f['difference'])} (95% CI {_num(low)} to {_num(high)}), lift "
                f"{_pct(f['lift'])} (95% CI {_pct(f['lift_ci'][0])} to {_pct(f['lift_ci'][1])})"
            )
            low, high = s["confidence_sequence"]
            lines.append(
                f"  sequential (mSPRT, always valid): {s['verdict']}, p={_num(s['p_value'])}, "
                f"confidence sequence {_num(low)} to {_num(high)}, {s['looks']} looks"
            )
            for g in c["guardrails"]:
                lines.append(
                    f"  guardrail {g['metric']} (max -{g['max_degradation']:.0%}): "
                    f"{g['status']}, lift {_pct(g['lift'])}"
                )
            if "cuped" in c:
                cu = c["cuped"]
                lines.append(
                    f"  CUPED ({cu['pre_experiment']}): lift {_pct(cu['lift'])} (95% CI "
                    f"{_pct(cu['lift_ci'][0])} to {_pct(cu['lift_ci'][1])}), standard error "
                    f"x{_num(cu['stderr_ratio'], 2)}"
                )
        if e["srm"]:
            srm = e["srm"]
            lines.append(
                f"sample ratio: users {' / '.join(map(str, srm['users']))}, expected "
                f"{' / '.join(map(str, srm['expected']))}, p={_num(srm['p_value'])}: "
                f"{'MISMATCH' if srm['flagged'] else 'ok'}"
            )
        for il in e["interleaving"]:
            lines.append(
                f"interleaving {il['variant']}: {il['a']} {il['wins_a']} : {il['b']} "
                f"{il['wins_b']} (ties {il['ties']}), sign test p={_num(il['p_value'])}: "
                f"{il['verdict']}; always valid p={_num(il['sequential_p_value'])}: "
                f"{il['sequential_verdict']}"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


def command_experiment(args: Any) -> int:
    """``streamrank experiment report``."""
    from engine.experiment_report import experiment_report
    from engine.redis_store import RedisStore
    from engine.store import StoreUnavailable
    from streams.settings import Settings

    settings = Settings.from_env()
    store = RedisStore(settings.redis_url, key_prefix=settings.topic_prefix, timeout_s=5.0)
    try:
        report = experiment_report(store, time.time(), history_s=args.history)
    except StoreUnavailable as error:
        print(f"streamrank experiment: Redis unreachable ({error})")
        return 1
    finally:
        store.client.close()
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_report(report))
    return 0
