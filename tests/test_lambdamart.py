"""The LambdaMART peer: it learns what labels depend on, and its bench runs on the MIND fixture."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import orjson
import pytest

from models.lambdamart import LambdaMART
from models.metrics import RankingMetrics
from streamrank.importers import import_mind

ROOT = Path(__file__).resolve().parent.parent
MIND = ROOT / "tests" / "fixtures" / "mind"


def generated(seed: int, lists: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Lists of 15-40 candidates with 4 features; clicks follow feature 2 and noise."""
    rng = np.random.default_rng(seed)
    features, labels = [], []
    for _ in range(lists):
        x = rng.normal(size=(int(rng.integers(15, 40)), 4))
        features.append(x)
        labels.append(x[:, 2] + 0.5 * rng.normal(size=len(x)) > 1.2)
    return features, labels


def ndcg(scores: list[np.ndarray], labels: list[np.ndarray]) -> float:
    metrics = RankingMetrics()
    for s, y in zip(scores, labels, strict=True):
        order = np.argsort(-s, kind="stable")
        metrics.add(y[order].tolist(), s[order].tolist())
    return metrics.summary()["ndcg@10"]


def test_ranks_better_than_random_and_repeats() -> None:
    features, labels = generated(seed=1, lists=400)
    model = LambdaMART(n_estimators=60).fit(features[:300], labels[:300])
    test_x, test_y = features[300:], labels[300:]
    learned = ndcg([model.score(x) for x in test_x], test_y)
    rng = np.random.default_rng(2)
    random = ndcg([rng.random(len(x)) for x in test_x], test_y)
    assert learned > random + 0.3, (learned, random)

    again = LambdaMART(n_estimators=60).fit(features[:300], labels[:300])
    assert np.array_equal(model.score(test_x[0]), again.score(test_x[0]))


def test_early_stopping_keeps_the_best_round() -> None:
    features, labels = generated(seed=3, lists=300)
    model = LambdaMART(n_estimators=300).fit(
        features[:200],
        labels[:200],
        valid=(features[200:250], labels[200:250]),
        early_stopping_rounds=10,
    )
    assert 0 < model.best_iteration < 300
    assert model.booster.best_iteration == model.best_iteration
    assert ndcg([model.score(x) for x in features[250:]], labels[250:]) > 0.6


def test_needs_lists_with_pairs() -> None:
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="no list"):
        LambdaMART().fit([x, x], [[False] * 3, [True] * 3])
    with pytest.raises(RuntimeError, match="fit"):
        LambdaMART().score(x)


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_lambdamart", ROOT / "bench" / "lambdamart.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_bench_on_the_mind_fixture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "mind.jsonl"
    log.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in import_mind(MIND)))
    out = tmp_path / "result.json"
    result = load_bench().main(["--log", str(log), "--json", str(out)])

    table = capsys.readouterr().out
    assert "| LambdaMART (LightGBM" in table and "| streamrank (online" in table
    assert "| baseline: input order |" in table
    assert result["held_out_requests_with_clicks"] == 17
    assert result["split"]["tuning_requests"] == 38
    for metrics in result["rows"].values():
        assert all(0.0 <= metrics[m] <= 1.0 for m in ("ndcg@10", "mrr", "hr@10", "auc"))
    assert orjson.loads(out.read_bytes())["rows"] == result["rows"]
    assert "LambdaMART minus streamrank, paired over the 17 requests" in table
    # The per-request figures behind the paired difference agree with the table's means.
    rows = list(result["rows"].values())
    gap = result["lambdamart_minus_streamrank"]["ndcg@10"]["mean"]
    assert gap == pytest.approx(rows[1]["ndcg@10"] - rows[0]["ndcg@10"], abs=2e-4)
