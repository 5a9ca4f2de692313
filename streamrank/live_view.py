"""What ``streamrank up`` and ``simulate`` measure, and how: a live view and a final summary.

:class:`Metrics` counts what the simulated search layer sees: requests sent and answered,
end-to-end latency (from just before the request is produced to the moment its ranked
result is read back), clicks, add-to-carts and purchases per variant, and the model
version the results carry. :func:`render_view` draws the live view, :func:`render_summary`
the final one; :meth:`Metrics.summary` is the summary as a dict (``--json``).

CTR here is *clicks per search*: the clicks a variant's answered requests got, divided by
those requests (a result page is one impression of the variant). Its 95% interval is the
normal approximation over requests, so that several clicks on one page count as the
correlated events they are. The lift is personalized over control, minus one, with a
delta-method interval on the log of the ratio.

>>> metrics = Metrics(started=0.0)
>>> metrics.sent(0.0)
>>> metrics.answered(0.5, 12.0, {"variant": "control", "model_version": "online:0"})
>>> metrics.feedback("control", [{"type": "click"}, {"type": "add_to_cart"}])
>>> summary = metrics.summary(now=1.0)
>>> summary["requests_answered"], summary["variants"]["control"]["ctr"], summary["latency_ms"]
(1, 1.0, {'p50': 12.0, 'p99': 12.0, 'max': 12.0})
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

VARIANTS = ("control", "personalized")
Z95 = 1.959964
#: Width of the timeline's buckets, in seconds.
BUCKET_S = 5.0
CTR_DEFINITION = (
    "clicks per answered search request (one result page = one impression of the "
    "variant); ci95: normal approximation over requests"
)


@dataclass(slots=True)
class Tally:
    """One variant's requests and what the shoppers did with their results."""

    requests: int = 0
    clicks: int = 0
    clicks_squared: int = 0  # sum over requests of clicks^2, for the variance
    add_to_carts: int = 0
    purchases: int = 0
    revenue: float = 0.0

    def ctr(self) -> float:
        return self.clicks / self.requests if self.requests else 0.0

    def standard_error(self) -> float:
        n = self.requests
        if n < 2:
            return math.inf
        mean = self.clicks / n
        variance = max(self.clicks_squared / n - mean * mean, 0.0) * n / (n - 1)
        return math.sqrt(variance / n)

    def ci95(self) -> tuple[float, float] | None:
        se = self.standard_error()
        if not math.isfinite(se):
            return None
        return max(self.ctr() - Z95 * se, 0.0), self.ctr() + Z95 * se

    def copy(self) -> Tally:
        return Tally(
            self.requests,
            self.clicks,
            self.clicks_squared,
            self.add_to_carts,
            self.purchases,
            self.revenue,
        )


def lift(control: Tally, personalized: Tally) -> tuple[float | None, tuple[float, float] | None]:
    """Relative CTR lift of personalized over control, and its 95% interval."""
    c, p = control.ctr(), personalized.ctr()
    if c <= 0 or p <= 0:
        return None, None
    se_c, se_p = control.standard_error(), personalized.standard_error()
    if not (math.isfinite(se_c) and math.isfinite(se_p)):
        return p / c - 1.0, None
    spread = math.sqrt((se_c / c) ** 2 + (se_p / p) ** 2)
    log_ratio = math.log(p / c)
    low, high = (math.exp(log_ratio + s * Z95 * spread) - 1.0 for s in (-1, 1))
    return p / c - 1.0, (low, high)


def separated(control: Tally, personalized: Tally) -> bool:
    """True when personalized's 95% interval lies wholly above control's."""
    c, p = control.ci95(), personalized.ci95()
    return c is not None and p is not None and p[0] > c[1]


@dataclass(slots=True)
class _Bucket:
    sent: int = 0
    answered: int = 0
    unanswered: int = 0
    tallies: dict[str, list[int]] = field(default_factory=lambda: {v: [0, 0] for v in VARIANTS})


class Metrics:
    """Counters of one ``up`` or ``simulate`` run; times are ``time.monotonic()`` seconds."""

    def __init__(self, started: float, latency_window_s: float = 10.0) -> None:
        self.started = started
        self.requests_sent = 0
        self.requests_answered = 0
        self.requests_unanswered = 0
        self.late_results = 0
        self.degraded = 0
        self.variants = {v: Tally() for v in VARIANTS}
        self.model_version: str | None = None
        self.model_first_learned_s: float | None = None
        self.latencies: list[float] = []
        self._recent: deque[tuple[float, float]] = deque()  # (answered at, latency ms)
        self.latency_window_s = latency_window_s
        self._buckets: dict[int, _Bucket] = {}
        # Cumulative tallies once a second, to tell when the lift became clear.
        self._history: list[tuple[float, int, Tally, Tally]] = []
        self.incidents: list[dict[str, Any]] = []

    @property
    def in_flight(self) -> int:
        return self.requests_sent - self.requests_answered - self.requests_unanswered

    def elapsed(self, now: float) -> float:
        return max(now - self.started, 0.0)

    def _bucket(self, now: float) -> _Bucket:
        return self._buckets.setdefault(int(self.elapsed(now) // BUCKET_S), _Bucket())

    # --- recording ---------------------------------------------------------------------------

    def sent(self, now: float) -> None:
        self.requests_sent += 1
        self._bucket(now).sent += 1

    def unanswered(self, now: float) -> None:
        self.requests_unanswered += 1
        self._bucket(now).unanswered += 1

    def answered(self, now: float, latency_ms: float, result: dict[str, Any]) -> None:
        self.requests_answered += 1
        self._bucket(now).answered += 1
        self.latencies.append(latency_ms)
        self._recent.append((now, latency_ms))
        if result.get("degraded"):
            self.degraded += 1
        version = result.get("model_version")
        if version is not None:
            self.model_version = str(version)
            if self.model_first_learned_s is None and not str(version).endswith(":0"):
                self.model_first_learned_s = round(self.elapsed(now), 1)

    def feedback(self, variant: str, events: Sequence[dict[str, Any]], now: float = 0.0) -> None:
        """The shopper's reaction to one answered request of ``variant``."""
        tally = self.variants.setdefault(variant, Tally())
        clicks = sum(1 for e in events if e["type"] == "click")
        tally.requests += 1
        tally.clicks += clicks
        tally.clicks_squared += clicks * clicks
        tally.add_to_carts += sum(1 for e in events if e["type"] == "add_to_cart")
        for event in events:
            if event["type"] == "purchase":
                tally.purchases += 1
                tally.revenue += float(event.get("value") or 0.0)
        counts = self._bucket(now).tallies.setdefault(variant, [0, 0])
        counts[0] += 1
        counts[1] += clicks

    def incident(self, now: float, text: str) -> None:
        self.incidents.append({"t": round(self.elapsed(now), 1), "what": text})

    def tick(self, now: float) -> None:
        """Called about once a second: remembers the cumulative tallies for :meth:`clear_after`."""
        control, personalized = (self.variants[v].copy() for v in VARIANTS)
        self._history.append((self.elapsed(now), self.requests_answered, control, personalized))

    # --- reading -------------------------------------------------------------------------------

    def recent_latency(self, now: float) -> tuple[float, float] | None:
        """(p50, p99) of the latencies of the last ``latency_window_s`` seconds."""
        while self._recent and self._recent[0][0] < now - self.latency_window_s:
            self._recent.popleft()
        if not self._recent:
            return None
        values = np.array([latency for _, latency in self._recent])
        return float(np.percentile(values, 50)), float(np.percentile(values, 99))

    def recent_rate(self, now: float, window_s: float = 5.0) -> float:
        """Answers per second over the last ``window_s`` seconds."""
        window = min(window_s, self.latency_window_s, max(self.elapsed(now), 1e-9))
        return sum(1 for t, _ in self._recent if t >= now - window) / window

    def clear_after(self) -> dict[str, float] | None:
        """When the lift became clear: the first moment from which personalized's 95%
        interval stayed above control's until the end (answered requests and seconds)."""
        first = None
        for t, answered, control, personalized in self._history:
            if separated(control, personalized):
                if first is None:
                    first = {"requests": answered, "s": round(t, 1)}
            else:
                first = None
        return first

    def summary(self, now: float, **extra: Any) -> dict[str, Any]:
        """The final numbers as a JSON-ready dict; ``extra`` is merged in (ports, workers...)."""
        duration = self.elapsed(now)
        latencies = np.array(self.latencies) if self.latencies else None

        def percentile(q: float) -> float | None:
            return None if latencies is None else round(float(np.percentile(latencies, q)), 2)

        control, personalized = self.variants["control"], self.variants["personalized"]
        relative, interval = lift(control, personalized)
        variants = {}
        for name in VARIANTS:
            tally = self.variants[name]
            ci = tally.ci95()
            variants[name] = {
                "requests": tally.requests,
                "clicks": tally.clicks,
                "ctr": round(tally.ctr(), 4),
                "ctr_ci95": None if ci is None else [round(ci[0], 4), round(ci[1], 4)],
                "add_to_carts": tally.add_to_carts,
                "purchases": tally.purchases,
                "revenue": round(tally.revenue, 2),
            }
        timeline = []
        for index in sorted(self._buckets):
            bucket = self._buckets[index]
            entry: dict[str, Any] = {
                "t": round((index + 1) * BUCKET_S, 1),
                "sent": bucket.sent,
                "answered": bucket.answered,
                "unanswered": bucket.unanswered,
            }
            for name in VARIANTS:
                requests, clicks = bucket.tallies.get(name, [0, 0])
                entry[f"ctr_{name}"] = round(clicks / requests, 3) if requests else None
            timeline.append(entry)
        summary: dict[str, Any] = {
            "duration_s": round(duration, 2),
            "requests_sent": self.requests_sent,
            "requests_answered": self.requests_answered,
            "requests_unanswered": self.requests_unanswered,
            "answered_ratio": round(self.requests_answered / self.requests_sent, 4)
            if self.requests_sent
            else None,
            "requests_per_s": round(self.requests_answered / duration, 2) if duration else 0.0,
            "latency_ms": {"p50": percentile(50), "p99": percentile(99), "max": percentile(100)},
            "ctr_definition": CTR_DEFINITION,
            "variants": variants,
            "lift": None if relative is None else round(relative, 4),
            "lift_ci95": None if interval is None else [round(v, 4) for v in interval],
            "clear_after": self.clear_after(),
            "model_version": self.model_version,
            "model_first_learned_s": self.model_first_learned_s,
            "degraded_results": self.degraded,
            "late_results": self.late_results,
            "incidents": self.incidents,
        }
        summary.update(extra)
        summary["timeline"] = timeline
        return summary


# --- drawing -----------------------------------------------------------------------------------

CURSOR_HOME = "\x1b[H"
CLEAR_LINE = "\x1b[K"  # to the end of the line
CLEAR_BELOW = "\x1b[J"  # to the end of the screen


def redraw(text: str) -> str:
    """``text`` drawn over the previous frame from the top of the screen: each line is
    overwritten and cleared to its end, then the rest of the screen, so nothing flickers."""
    return (
        CURSOR_HOME + "".join(line + CLEAR_LINE + "\n" for line in text.split("\n")) + (CLEAR_BELOW)
    )


def _ctr_line(name: str, tally: Tally) -> str:
    ci = tally.ci95()
    interval = "" if ci is None else f"  95% CI [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"  {name:<13} {tally.ctr():6.3f}{interval}  ({tally.requests} searches)"


def _lift_text(metrics: Metrics) -> str:
    relative, interval = lift(metrics.variants["control"], metrics.variants["personalized"])
    if relative is None:
        return "lift          n/a"
    text = f"lift          {relative:+.1%}"
    if interval is not None:
        text += f"  95% CI [{interval[0]:+.1%}, {interval[1]:+.1%}]"
    clear = metrics.clear_after()
    if clear is not None:
        text += f"  (clear since {clear['requests']} requests, {clear['s']:.0f} s)"
    return text


def render_view(
    metrics: Metrics, now: float, header: Iterable[str], footer: Iterable[str] = ()
) -> str:
    """The live view: the stack's addresses, then traffic, latency, CTR by variant, model."""
    lines = list(header)
    latency = metrics.recent_latency(now)
    lines += [
        "",
        f"requests/s    {metrics.recent_rate(now):6.1f}   sent {metrics.requests_sent}, "
        f"answered {metrics.requests_answered}, timed out {metrics.requests_unanswered}, "
        f"in flight {metrics.in_flight}"
        + (f", degraded {metrics.degraded}" if metrics.degraded else ""),
        "latency ms    "
        + ("n/a" if latency is None else f"p50 {latency[0]:.1f}   p99 {latency[1]:.1f}")
        + f"   (end to end, last {metrics.latency_window_s:.0f} s)",
        "CTR (clicks per search)",
        _ctr_line("control", metrics.variants["control"]),
        _ctr_line("personalized", metrics.variants["personalized"]),
        _lift_text(metrics),
        f"model         {metrics.model_version or 'n/a'}",
    ]
    for incident in metrics.incidents[-5:]:
        lines.append(f"! {incident['t']:>6.1f} s  {incident['what']}")
    lines += list(footer)
    return "\n".join(lines)


def render_line(metrics: Metrics, now: float) -> str:
    """One compact progress line, for output that is not a terminal."""
    latency = metrics.recent_latency(now)
    control, personalized = metrics.variants["control"], metrics.variants["personalized"]
    relative, _ = lift(control, personalized)
    return (
        f"[{metrics.elapsed(now):6.1f} s] {metrics.recent_rate(now):5.1f} req/s, "
        f"answered {metrics.requests_answered}/{metrics.requests_sent}, "
        + ("latency n/a" if latency is None else f"p50 {latency[0]:.1f} ms p99 {latency[1]:.1f} ms")
        + f", CTR control {control.ctr():.3f} personalized {personalized.ctr():.3f}"
        + ("" if relative is None else f" (lift {relative:+.1%})")
        + f", model {metrics.model_version or 'n/a'}"
    )


def render_summary(summary: dict[str, Any]) -> str:
    """The final summary for people (``--json`` prints the dict instead)."""
    latency = summary["latency_ms"]
    lines = [
        f"summary after {summary['duration_s']:.1f} s (stopped by {summary.get('stopped_by')})",
        f"  requests      sent {summary['requests_sent']}, answered "
        f"{summary['requests_answered']} ({summary['requests_per_s']:.1f}/s), timed out "
        f"{summary['requests_unanswered']}",
        f"  latency ms    p50 {latency['p50']}  p99 {latency['p99']}  max {latency['max']}",
    ]
    for name, variant in summary["variants"].items():
        ci = variant["ctr_ci95"]
        interval = "" if ci is None else f"  95% CI [{ci[0]:.3f}, {ci[1]:.3f}]"
        lines.append(
            f"  {name:<13} CTR {variant['ctr']:.3f}{interval}  {variant['requests']} searches, "
            f"{variant['clicks']} clicks, {variant['add_to_carts']} carts, "
            f"{variant['purchases']} purchases ({variant['revenue']:.2f})"
        )
    if summary["lift"] is not None:
        text = f"  lift          {summary['lift']:+.1%}"
        if summary["lift_ci95"]:
            low, high = summary["lift_ci95"]
            text += f"  95% CI [{low:+.1%}, {high:+.1%}]"
        clear = summary["clear_after"]
        text += (
            f"; clear after {clear['requests']} requests ({clear['s']:.0f} s)"
            if clear
            else "; not clear (intervals overlap)"
        )
        lines.append(text)
    lines.append(
        f"  model         {summary['model_version']} (first learned model after "
        f"{summary['model_first_learned_s']} s)"
    )
    for incident in summary["incidents"]:
        lines.append(f"  ! {incident['t']} s: {incident['what']}")
    return "\n".join(lines)
