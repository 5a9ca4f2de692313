"""Off-policy estimators on problems with known answers, the OBD importer on a committed
slice of the real data, and `streamrank ope` end to end."""

from __future__ import annotations

import csv
import gzip
import itertools
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import orjson
import pytest

from engine.messages import parse_catalog_item, parse_interaction, parse_search_request
from models.off_policy import (
    ItemPositionCTR,
    doubly_robust,
    ips,
    on_policy,
    plackett_luce_marginals,
    snips,
    top_k_marginals,
)
from streamrank.cli import main
from streamrank.importers import IMPORTERS, import_obd
from streamrank.importers.obd import user_id
from streamrank.obd_eval import OPEOptions, logged_rows, run_policies, streamrank_policies

OBD = Path(__file__).parent / "fixtures" / "obd"


# --- estimators ------------------------------------------------------------------------------


def test_on_policy_is_the_mean_with_a_normal_interval() -> None:
    estimate = on_policy([0, 1, 0, 0])
    assert estimate.value == 0.25
    assert estimate.stderr == pytest.approx(0.5 / 2)  # sd (ddof 1) 0.5 over sqrt(4)
    assert (estimate.low, estimate.high) == pytest.approx(
        (0.25 - 1.96 * 0.25, 0.25 + 1.96 * 0.25), abs=1e-4
    )
    assert estimate.n == 4 and estimate.ess == 4


def test_hand_computed_values() -> None:
    rewards, logger, target = [1, 0, 0, 1], [0.5] * 4, [1.0, 0.0, 1.0, 0.0]
    # weights 2, 0, 2, 0: IPS terms 2, 0, 0, 0
    assert ips(rewards, logger, target).value == 0.5
    assert ips(rewards, logger, target).stderr == pytest.approx(1.0 / 2)
    assert ips(rewards, logger, target).ess == 2.0
    # SNIPS: 2 / 4; linearized terms w (r - 0.5) / mean(w) = 1, 0, -1, 0
    assert snips(rewards, logger, target).value == 0.5
    assert snips(rewards, logger, target).stderr == pytest.approx(np.std([1, 0, -1, 0], ddof=1) / 2)
    # DR with q = 0.25 for the logged item, 0.4 expected under the target: 0.4 + w (r - 0.25)
    dr = doubly_robust(rewards, logger, target, [0.25] * 4, [0.4] * 4)
    assert dr.value == pytest.approx(np.mean([0.4 + 1.5, 0.4, 0.4 - 0.5, 0.4]))


def test_matches_open_bandit_pipeline() -> None:
    """Values from obp 0.4.1 (``IPW``, ``SNIPW``, ``DoublyRobust``) on the same rows."""
    action, position = np.array([0, 1, 2, 0, 2, 1]), np.array([0, 1, 0, 1, 1, 0])
    reward = np.array([1.0, 0, 0, 1, 1, 0])
    pscore = np.array([0.2, 0.5, 0.3, 0.4, 0.25, 0.5])
    pi_e = np.array([[0.6, 0.3], [0.3, 0.2], [0.1, 0.5]])  # item x position, columns sum to 1
    q = np.array([[0.5, 0.4], [0.2, 0.1], [0.3, 0.6]])
    target = pi_e[action, position]
    q_logged = q[action, position]
    q_target = (pi_e * q).sum(axis=0)[position]
    assert ips(reward, pscore, target).value == pytest.approx(0.9583333333333334, rel=1e-12)
    assert snips(reward, pscore, target).value == pytest.approx(0.811764705882353, rel=1e-12)
    dr = doubly_robust(reward, pscore, target, q_logged, q_target)
    assert dr.value == pytest.approx(0.8300000000000001, rel=1e-12)


def test_the_logger_evaluated_off_policy_is_its_own_mean() -> None:
    rng = np.random.default_rng(1)
    propensity = rng.uniform(0.05, 0.5, size=500)
    clicks = rng.random(500) < 0.1
    mean = on_policy(clicks)
    assert ips(clicks, propensity, propensity).value == pytest.approx(mean.value)
    assert ips(clicks, propensity, propensity).stderr == pytest.approx(mean.stderr)
    assert snips(clicks, propensity, propensity).value == pytest.approx(mean.value)
    assert snips(clicks, propensity, propensity * 7.0).value == pytest.approx(mean.value)


def bandit(seed: int, n: int) -> tuple[dict[str, np.ndarray], float]:
    """A uniform logger over 10 items and 3 positions for 4 kinds of users, with known click
    rates, and a target policy that shows each user's best 3 items: the rows, and the
    target's true value."""
    rng = np.random.default_rng(seed)
    users, items, positions = 4, 10, 3
    theta = np.linspace(0.05, 0.9, users * items).reshape(users, items)
    rng.permuted(theta, axis=1, out=theta)
    examine = np.array([1.0, 0.7, 0.5])  # position bias
    pi_e = np.stack([top_k_marginals(np.argsort(-t), items, positions) for t in theta])
    truth = np.mean(
        [pi_e[u][:, p] @ (theta[u] * examine[p]) for u in range(users) for p in range(positions)]
    )
    x = rng.integers(users, size=n)
    p = rng.integers(positions, size=n)
    a = rng.integers(items, size=n)
    click = (rng.random(n) < theta[x, a] * examine[p]).astype(float)
    q_true = theta[x] * examine[p][:, None]  # the perfect reward model, rows x items
    rows = {
        "reward": click,
        "propensity": np.full(n, 1.0 / items),
        "target": pi_e[x, a, p],
        "q_logged": q_true[np.arange(n), a],
        "q_target": (pi_e[x, :, p] * q_true).sum(axis=1),
    }
    return rows, float(truth)


def test_ips_and_dr_intervals_cover_a_known_truth() -> None:
    rows, truth = bandit(seed=0, n=20_000)
    args = (rows["reward"], rows["propensity"], rows["target"])
    estimate = ips(*args)
    assert estimate.low <= truth <= estimate.high
    assert estimate.ess == pytest.approx(20_000 / 10, rel=0.05)  # one logged row in 10 matches
    dr = doubly_robust(*args, rows["q_logged"], rows["q_target"])
    assert dr.low <= truth <= dr.high
    # A perfect reward model leaves only the clicks' own noise on the matching rows.
    assert dr.stderr < 0.8 * estimate.stderr
    assert snips(*args).low <= truth <= snips(*args).high


def test_intervals_have_about_95_percent_coverage() -> None:
    covered = Counter()
    runs = 200
    for seed in range(runs):
        rows, truth = bandit(seed, n=2000)
        args = (rows["reward"], rows["propensity"], rows["target"])
        for name, estimate in (
            ("ips", ips(*args)),
            ("snips", snips(*args)),
            ("dr", doubly_robust(*args, rows["q_logged"], rows["q_target"])),
        ):
            covered[name] += estimate.low <= truth <= estimate.high
    for name in ("ips", "snips", "dr"):
        assert 0.89 <= covered[name] / runs <= 0.99, (name, covered[name])


def test_bad_propensities_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        ips([1, 0], [0.5, 0.0], [1.0, 0.0])
    with pytest.raises(ValueError):
        ips([1, 0], [0.5, 0.5], [1.0])


def test_snips_without_any_weight_is_nan() -> None:
    assert np.isnan(snips([1, 0], [0.5, 0.5], [0.0, 0.0]).value)


def enumerated_marginals(w: list[float], k: int) -> np.ndarray:
    """Plackett-Luce marginals by enumerating every top-k prefix, in exact fractions."""
    weights = [Fraction(x) for x in w]
    marginals = [[Fraction(0)] * k for _ in w]
    for prefix in itertools.permutations(range(len(w)), k):
        probability, left = Fraction(1), sum(weights)
        for item in prefix:
            probability *= weights[item] / left
            left -= weights[item]
        for p, item in enumerate(prefix):
            marginals[item][p] += probability
    return np.array(marginals, dtype=np.float64)


@pytest.mark.parametrize("w", [[5.0, 1.0, 3.0, 0.5, 2.0], [1e12, 1.0, 0.5, 2e6, 0.3]])
def test_plackett_luce_marginals_are_exact(w: list[float]) -> None:
    """The second set leaves weights 1e-12 of the total after the first two picks."""
    expected = enumerated_marginals(w, 3)
    exact = plackett_luce_marginals(np.log(w), k=3)
    np.testing.assert_allclose(exact, expected, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(exact.sum(axis=0), 1.0)
    sampled = plackett_luce_marginals(np.log(w), k=3, samples=40_000, seed=1)
    np.testing.assert_allclose(sampled, expected, atol=0.01)


def test_plackett_luce_with_large_gaps_is_the_greedy_ranking() -> None:
    utilities = np.array([1.0, 3.0, 2.0, 0.0]) * 200.0
    np.testing.assert_allclose(
        plackett_luce_marginals(utilities, k=3), top_k_marginals([1, 2, 0], 4, 3), atol=1e-9
    )


def test_item_position_ctr_shrinks_to_the_position_rate() -> None:
    model = ItemPositionCTR(n_items=3, n_positions=2, prior_shows=10.0, prior_ctr=0.0)
    for _ in range(100):
        model.learn_one(0, 1, shows=1)
        model.learn_one(1, 2, shows=1)
    model.learn_one(0, 1, clicks=10)
    q = model.predict_proba_many()
    assert q[0, 0] == pytest.approx((10 + 10 * 10 / 102) / 110)
    assert q[2, 0] == pytest.approx(10 / 102)  # never shown: the position's rate
    assert q[1, 1] == 0.0 and q[2, 1] == 0.0


# --- importer --------------------------------------------------------------------------------


def raw_rows(policy: str) -> list[dict[str, str]]:
    with gzip.open(OBD / policy / "all.csv.gz", "rt", encoding="utf-8") as log:
        return list(csv.DictReader(log))


@pytest.fixture(scope="module")
def events() -> list[dict]:
    return list(import_obd(OBD / "random"))


def test_fixture_is_a_small_real_slice() -> None:
    assert sum(p.stat().st_size for p in OBD.rglob("*") if p.is_file()) < 100_000
    assert len(raw_rows("random")) == len(raw_rows("bts")) == 1000
    assert IMPORTERS["obd"] is import_obd


def test_every_event_parses_and_time_goes_forward(events: list[dict]) -> None:
    parsers = {
        "catalog": parse_catalog_item,
        "search-requests": parse_search_request,
        "interactions": parse_interaction,
    }
    for event in events:
        parsers[event["stream"]](orjson.dumps({k: v for k, v in event.items() if k != "stream"}))
    stamps = [event["ts"] for event in events]
    assert stamps == sorted(stamps)
    requests = [e["request_id"] for e in events if e["stream"] == "search-requests"]
    assert len(requests) == len(set(requests))


def test_clicks_positions_and_propensities_are_carried(events: list[dict]) -> None:
    raw = raw_rows("random")
    clicks = [e for e in events if e["stream"] == "interactions"]
    assert len(clicks) == sum(row["click"] == "1" for row in raw) == 2
    shown = {
        (e["request_id"], s["item_id"]): s
        for e in events
        if e["stream"] == "search-requests"
        for s in e["context"]["obd"]["shown"]
    }
    assert len(shown) == len(raw)
    by_row = {s["row"]: s for s in shown.values()}
    for row in raw:
        logged = by_row[int(row[""])]
        assert logged["item_id"] == row["item_id"]
        assert logged["position"] == int(row["position"])
        assert logged["propensity"] == float(row["propensity_score"]) == 0.0125
    for click in clicks:
        logged = shown[(click["request_id"], click["item_id"])]
        assert raw[logged["row"]]["click"] == "1"
        assert click["position"] == logged["position"]


def test_requests_offer_every_item_and_the_catalog_its_features(events: list[dict]) -> None:
    items = list(csv.DictReader((OBD / "random" / "item_context.csv").open(encoding="utf-8")))
    catalog = [e for e in events if e["stream"] == "catalog"]
    assert [e["item_id"] for e in catalog] == [str(i) for i in range(80)]
    assert catalog[5]["category"] == items[5]["item_feature_1"]
    assert catalog[5]["brand"] == items[5]["item_feature_2"]
    assert "price" not in catalog[5]
    request = next(e for e in events if e["stream"] == "search-requests")
    assert [c["item_id"] for c in request["candidates"]] == [str(i) for i in range(80)]
    first = raw_rows("random")[0]
    assert request["user_id"] == user_id([first[f"user_feature_{i}"] for i in range(4)])
    assert request["context"]["obd"]["policy"] == "random"


def test_the_dataset_folder_means_its_random_log(events: list[dict]) -> None:
    assert list(import_obd(OBD)) == events


def write_log(folder: Path, rows: list[tuple[str, int, int, int, str]]) -> None:
    """A hand-made OBD policy folder: (timestamp, item, position, click, user) per row."""
    folder.mkdir()
    header = ["", "timestamp", "item_id", "position", "click", "propensity_score"]
    header += [f"user_feature_{i}" for i in range(4)]
    header += [f"user-item_affinity_{i}" for i in range(3)]
    lines = [",".join(header)]
    for n, (ts, item, position, click, user) in enumerate(rows):
        fields = [n, f"2019-11-24 00:00:{ts}+00:00", item, position, click, 0.1]
        lines.append(",".join(map(str, [*fields, user, "b", "c", "d", 0.0, 0.0, 0.0])))
    (folder / "all.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = ["item_id,item_feature_0,item_feature_1,item_feature_2,item_feature_3"]
    items[0] = "," + items[0]  # the unnamed index column
    items += [f"{i},{i},0.5,cat{i},brand{i},x" for i in range(3)]
    (folder / "item_context.csv").write_text("\n".join(items) + "\n", encoding="utf-8")


def test_rows_of_one_user_moments_apart_form_one_impression(tmp_path: Path) -> None:
    write_log(
        tmp_path / "random",
        [
            ("01.000000", 0, 1, 0, "u1"),
            ("01.000400", 1, 3, 1, "u1"),  # same user, 0.4 ms later: the same impression
            ("01.000400", 2, 2, 0, "u2"),  # another user at once: another impression
            ("01.050000", 2, 1, 0, "u1"),  # position 1 is taken: a new impression
            ("09.000000", 2, 2, 0, "u1"),  # 8 s later: a new impression
        ],
    )
    events = list(import_obd(tmp_path))
    requests = [e for e in events if e["stream"] == "search-requests"]
    shown = [
        [(s["item_id"], s["position"]) for s in r["context"]["obd"]["shown"]] for r in requests
    ]
    assert shown == [[("0", 1), ("1", 3)], [("2", 2)], [("2", 1)], [("2", 2)]]
    assert requests[0]["user_id"] == requests[2]["user_id"] != requests[1]["user_id"]
    (click,) = [e for e in events if e["stream"] == "interactions"]
    assert (click["request_id"], click["item_id"], click["position"]) == ("obd-random-0", "1", 3)
    assert [e["category"] for e in events if e["stream"] == "catalog"] == ["cat0", "cat1", "cat2"]


# --- the engine as the evaluation policy -------------------------------------------------------


def test_the_replay_scores_every_row_before_learning_its_click() -> None:
    events = list(import_obd(OBD / "bts"))
    # The first 350 impressions hold bts's first click (row 312).
    cut = [e["ts"] for e in events if e["stream"] == "search-requests"][350]
    head = [e for e in events if e["ts"] < cut]
    rows = logged_rows(head)
    assert sum(rows.rewards) >= 1 and len(rows.rewards) == 350
    uniform = {"uniform": lambda ctr, order: np.full((len(ctr), 3), 1.0 / len(ctr))}
    policies = streamrank_policies((1.0,), 3) | uniform
    scored = run_policies(head, policies, OPEOptions())
    blind = run_policies([e for e in head if e["stream"] != "interactions"], policies)
    assert scored.rewards == rows.rewards and sum(blind.rewards) == 0
    first_click = scored.rewards.index(1.0)
    for name in policies:
        # up to and including the clicked row, nothing depends on the clicks
        assert scored.target[name][: first_click + 1] == blind.target[name][: first_click + 1]
    assert scored.target["uniform"] == [1.0 / 80] * len(rows.rewards)
    greedy = np.array(scored.target["streamrank greedy"])
    assert set(greedy.tolist()) <= {0.0, 1.0}
    pl = np.array(scored.target["streamrank PL T=1"])
    assert ((pl > 0) & (pl < 1)).all()


def test_cli_prints_the_estimates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for policy in ("random", "bts"):
        (tmp_path / policy).mkdir()
        with gzip.open(OBD / policy / "all.csv.gz", "rt", encoding="utf-8") as log:
            lines = log.readlines()
        (tmp_path / policy / "all.csv").write_text("".join(lines[:401]), encoding="utf-8")
        (tmp_path / policy / "item_context.csv").write_bytes(
            (OBD / policy / "item_context.csv").read_bytes()
        )
    report_path = tmp_path / "ope.json"
    assert main(["ope", str(tmp_path), "--json", str(report_path), "--temperature", "0.5"]) == 0
    out = capsys.readouterr().out
    for estimator in ("IPS", "SNIPS", "DR"):
        assert f"streamrank greedy            {estimator}" in out
        assert f"streamrank PL T=0.5          {estimator}" in out
    report = orjson.loads(report_path.read_bytes())
    results = {(r["policy"], r["estimator"]): r for r in report["results"]}
    clicks = sum(row["click"] == "1" for row in raw_rows("random")[:400])
    assert results[("random (logged)", "on-policy")]["value"] == clicks / 400
    assert ("bts (frequencies)", "DR") in results
    assert report["data"]["rows"] == 400
    for row in report["results"]:
        assert row["low"] <= row["value"] <= row["high"] or np.isnan(row["value"])
