"""The experiments page of a real worker, rendered by a real headless browser (chromium).

A worker runs with an experiments file; simulated shoppers search and click through the
broker; the page's JavaScript reads ``/experiments.json`` and draws numbers and charts,
and ``chromium --dump-dom`` returns the rendered DOM. The file is then changed and the
worker picks the change up without a restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from streamrank.client import SearchLayerClient
from streamrank.simulator import Simulator

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

CONFIG = {
    "experiments": [
        {"name": "blend", "layer": "ranking", "salt": "b1",
         "variants": [{"name": "control", "share": 0.5, "ranking": "control"},
                      {"name": "heavy", "share": 0.5, "ranking": {"retrieval_weight": 0.5}}],
         "primary_metric": "ctr",
         "guardrails": [{"metric": "latency_ms", "max_degradation": 1.0}]},
    ]
}  # fmt: skip


def fetch_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


async def shop(bootstrap: str, prefix: str, requests: int) -> None:
    sim = Simulator(seed=5)
    async with SearchLayerClient(bootstrap, prefix) as client:
        for item in sim.catalog_messages():
            await client.catalog(item)
        await asyncio.sleep(1.0)
        for n in range(requests):
            request = sim.next_request(now=time.time())
            result = await client.rank(request)
            for event in sim.feedback(request, result, now=time.time()):
                await client.interact(event)
            if n % 50 == 0:
                await asyncio.sleep(0.05)


def dump_dom(url: str, tmp_path: Path, screenshot: Path | None = None) -> str:
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=8000"]  # fmt: skip
    if screenshot is not None:
        subprocess.run(
            [*argv, "--window-size=1200,1500", f"--screenshot={screenshot}", url],
            capture_output=True, timeout=90, check=False,
        )  # fmt: skip
    done = subprocess.run(
        [*argv, "--dump-dom", url], capture_output=True, text=True, timeout=90, check=True
    )
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/test.sh does)")
def test_page_renders_live_numbers_and_charts_and_config_reloads(
    broker, start_worker, topic_prefix, tmp_path
) -> None:
    path = tmp_path / "experiments.json"
    path.write_text(json.dumps(CONFIG))
    worker = start_worker(experiments=str(path), online_warmup="50")
    base = f"http://127.0.0.1:{worker.env['STREAMRANK_WEB_PORT']}"
    asyncio.run(shop(broker.bootstrap, topic_prefix, 400))
    deadline = time.monotonic() + 30
    while True:
        report = fetch_json(f"{base}/experiments.json")
        (blend,) = report["experiments"]
        counted = sum(v["requests"] for v in blend["variants"].values())
        if counted >= 400 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert counted == 400, blend["variants"]
    assert blend["variants"]["control"]["clicks"] > 0 and blend["srm"]["flagged"] is False
    (comparison,) = blend["comparisons"]
    assert comparison["variant"] == "heavy" and comparison["sequential"]["looks"] >= 1

    screenshot = Path(os.environ.get("STREAMRANK_PAGE_SCREENSHOT", tmp_path / "page.png"))
    dom = dump_dom(f"{base}/experiments", tmp_path, screenshot)
    assert 'data-rendered="1"' in dom, dom[:2000]
    shown = dict(
        re.findall(r'data-variant="(\w+)" data-metric="requests">(\d+)<', dom)
    )  # the page reads the same counters, which no longer move
    assert {k: int(v) for k, v in shown.items()} == {
        name: v["requests"] for name, v in blend["variants"].items()
    }
    assert re.search(r'data-variant="heavy" data-metric="ctr">\d+\.\d{4}<', dom)
    charts = re.findall(r'<svg[^>]*class="chart"[^>]*data-metric="(\w+)"', dom)
    assert set(charts) >= {"ctr", "ctr_at_k", "mrr", "revenue_per_request", "latency_ms"}
    lines = re.findall(r'<polyline points="([^"]*)"[^>]*data-variant="(\w+)"', dom)
    assert {v for _, v in lines} == {"control", "heavy"}
    assert all(points.count(",") >= 1 for points, _ in lines)
    assert "heavy vs control on ctr" in dom and "sample ratio" in dom
    assert screenshot.exists() and screenshot.stat().st_size > 10_000

    # A bad file is refused and the running configuration kept; a good one is picked up.
    path.write_text("{broken")
    time.sleep(2.5)
    assert [e["name"] for e in fetch_json(f"{base}/experiments.json")["experiments"]] == ["blend"]
    changed = {"experiments": [*CONFIG["experiments"], {
        "name": "ui", "layer": "ui", "variants": [{"name": "a", "share": 0.5},
                                                  {"name": "b", "share": 0.5}]}]}  # fmt: skip
    path.write_text(json.dumps(changed))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        names = [e["name"] for e in fetch_json(f"{base}/experiments.json")["experiments"]]
        if names == ["blend", "ui"]:
            break
        time.sleep(0.3)
    assert names == ["blend", "ui"]
    assert "experiments file rejected" in worker.log_text()
    orjson.dumps(blend)
