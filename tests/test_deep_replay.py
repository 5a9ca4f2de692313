"""The deep model retrained periodically on a replayed log, judged beside the online model."""

from __future__ import annotations

from pathlib import Path

from models.deep_ctr import DeepConfig
from models.profile import RankingProfile
from streamrank.deep_replay import deep_replay, format_table
from streamrank.importers import import_mind

MIND = Path(__file__).parent / "fixtures" / "mind"
TINY = DeepConfig(
    user_buckets=64, item_buckets=256, category_buckets=16, brand_buckets=16, query_buckets=16
)


def test_online_deep_and_blend_are_judged_on_the_same_requests() -> None:
    report = deep_replay(
        list(import_mind(MIND)),
        retrain_every=10,
        epochs=1,
        profile=RankingProfile(deep_weight=0.3),
        log=lambda *_: None,
        config=TINY,
    )
    assert report["deep_weight"] == 0.3
    assert list(report["rows"]) == [
        "online", "deep", "blend 0.70/0.30", "blend 0.75/0.25", "blend 0.50/0.50", "blend 0.25/0.75"
    ]  # fmt: skip
    trainings = report["trainings"]
    assert trainings and all(t["examples"] > 0 for t in trainings)
    published = [t for t in trainings if t["published"]]
    assert published, trainings  # the first finite candidate is always accepted
    for row in report["rows"].values():
        assert 0.0 <= row["ndcg@10"] <= 1.0 and 0.0 <= row["pooled_auc"] <= 1.0
    # The deep model's scores differ from the online model's, so the rows do too.
    assert report["rows"]["deep"] != report["rows"]["online"]
    assert "| blend 0.70/0.30 |" in format_table(report)
