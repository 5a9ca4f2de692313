"""Experiments as configured: variants, traffic, layers, schedule and metrics.

The configuration is a JSON file (named by ``STREAMRANK_EXPERIMENTS``) that workers
reload when it changes (:class:`ConfigWatcher`); without one, every worker runs the
:func:`default_config`: ``control`` (the retrieval order) against ``personalized``, split
by ``STREAMRANK_CONTROL_SHARE``, as streamrank always did.

An experiment lives in a *layer*. Within a layer the experiments split the users between
them (each takes a range of the layer's hash), so a user is in at most one of them; the
layers hash the user independently, so experiments in different layers are orthogonal.
Inside an experiment, its own ``salt`` hashes the user onto its variants by their shares.

A variant's ``ranking`` is ``"control"`` (the retrieval order), ``"personalized"`` (the
worker's ranking configuration), an object of overrides of
:class:`~engine.ranking.RankingConfig` fields (``{"retrieval_weight": 0.05}``), or
``{"interleave": ["a", "b"]}``: each request merges the rankings of the experiment's
variants ``a`` and ``b`` by team draft (:mod:`engine.interleaving`).

>>> config = parse_config({"experiments": [{
...     "name": "blend", "layer": "ranking", "salt": "b1",
...     "variants": [{"name": "control", "share": 0.5, "ranking": "control"},
...                  {"name": "heavy", "share": 0.5, "ranking": {"retrieval_weight": 0.2}}],
...     "primary_metric": "ctr",
...     "guardrails": [{"metric": "latency_ms", "max_degradation": 0.25}]}]})
>>> blend = config.experiments[0]
>>> blend.control, [v.name for v in blend.treatments], blend.variant("heavy").overrides
('control', ['heavy'], {'retrieval_weight': 0.2})
>>> parse_config({"experiments": [{"name": "x", "variants": [{"name": "a", "share": 2}]}]})
Traceback (most recent call last):
...
engine.experiment_config.ConfigError: experiments[0].variants[0].share: must be within 0..1
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import Any

import orjson

from engine.ranking import CONTROL, PERSONALIZED, RankingConfig

#: The metrics an experiment can name, each a ratio over a user's search requests:
#: name -> (counter field, higher is better, default mixture scale ``tau`` of the mSPRT).
METRICS: dict[str, tuple[str, bool, float]] = {
    "ctr": ("clicks", True, 0.05),
    "ctr_at_k": ("clicks_at_k", True, 0.05),
    "mrr": ("rr", True, 0.03),
    "add_to_cart_rate": ("add_to_carts", True, 0.01),
    "purchase_rate": ("purchases", True, 0.005),
    "revenue_per_request": ("revenue", True, 0.5),
    "latency_ms": ("latency_ms", False, 0.5),
}
#: RankingConfig fields a variant may override (numbers and switches; not the nested ones).
OVERRIDABLE = tuple(
    f.name for f in fields(RankingConfig) if f.name not in ("features", "impressions")
)
DEFAULT_EXPERIMENT = "default"
DEFAULT_LAYER = "default"

KIND_CONTROL = "control"
KIND_RANKING = "ranking"
KIND_INTERLEAVE = "interleave"


class ConfigError(ValueError):
    """An experiment configuration that cannot be run; ``str()`` names the field."""


@dataclass(frozen=True, slots=True)
class Variant:
    """One arm: its traffic share and how it ranks.

    ``kind`` is ``"control"`` (retrieval order), ``"ranking"`` (the worker's ranking with
    ``overrides``) or ``"interleave"`` (team draft of the variants named in ``interleave``).
    """

    name: str
    share: float
    kind: str = KIND_RANKING
    overrides: dict[str, Any] = field(default_factory=dict)
    interleave: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Guardrail:
    """A metric that must not get worse than ``max_degradation`` (relative, 0.02 = 2 %)."""

    metric: str
    max_degradation: float
    higher_is_better: bool


@dataclass(frozen=True, slots=True)
class Experiment:
    """One experiment; see the module docstring and the README for the fields."""

    name: str
    variants: tuple[Variant, ...]
    layer: str = DEFAULT_LAYER
    salt: str = ""
    start: float = 0.0  # epoch seconds; 0: from the beginning
    stop: float = math.inf
    layer_range: tuple[float, float] = (0.0, 1.0)  # the part of the layer's hash it takes
    control: str = ""
    primary_metric: str = "ctr"
    guardrails: tuple[Guardrail, ...] = ()
    alpha: float = 0.05
    k: int = 5  # of CTR@k
    tau: dict[str, float] = field(default_factory=dict)  # mSPRT mixture scale per metric
    cuped_pre_experiment: str = ""  # experiment whose per-user totals are the covariate

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    @property
    def treatments(self) -> list[Variant]:
        """Variants compared with the control in an A/B sense (with traffic, not interleaved)."""
        return [
            v
            for v in self.variants
            if v.name != self.control and v.share > 0 and v.kind != KIND_INTERLEAVE
        ]

    @property
    def interleaved(self) -> list[Variant]:
        return [v for v in self.variants if v.kind == KIND_INTERLEAVE]

    def shares(self) -> dict[str, float]:
        """Variants with traffic and their shares (what the sample-ratio check expects)."""
        return {v.name: v.share for v in self.variants if v.share > 0}

    def running(self, now: float) -> bool:
        return self.start <= now < self.stop

    def tau_of(self, metric: str) -> float:
        return self.tau.get(metric, METRICS[metric][2])

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layer": self.layer,
            "salt": self.salt,
            "start": self.start,
            "stop": None if math.isinf(self.stop) else self.stop,
            "range": list(self.layer_range),
            "control": self.control,
            "variants": [_variant_dict(v) for v in self.variants],
            "primary_metric": self.primary_metric,
            "guardrails": [
                {
                    "metric": g.metric,
                    "max_degradation": g.max_degradation,
                    "higher_is_better": g.higher_is_better,
                }
                for g in self.guardrails
            ],
            "alpha": self.alpha,
            "k": self.k,
            "tau": self.tau,
            "cuped": {"pre_experiment": self.cuped_pre_experiment}
            if self.cuped_pre_experiment
            else None,
        }


@dataclass(frozen=True, slots=True)
class ExperimentConfig:
    """All experiments, in the order of the file (which is the order of layers' ranges)."""

    experiments: tuple[Experiment, ...]
    source: str = "default"

    def experiment(self, name: str) -> Experiment:
        for e in self.experiments:
            if e.name == name:
                return e
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "experiments": [e.to_dict() for e in self.experiments]}

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


def _variant_dict(v: Variant) -> dict[str, Any]:
    if v.kind == KIND_CONTROL:
        ranking: Any = CONTROL
    elif v.kind == KIND_INTERLEAVE:
        ranking = {"interleave": list(v.interleave or ())}
    else:
        ranking = dict(v.overrides) or PERSONALIZED
    return {"name": v.name, "share": v.share, "ranking": ranking}


def default_config(salt: str = "streamrank", control_share: float = 0.0) -> ExperimentConfig:
    """What workers run without a file: ``control`` against ``personalized`` for everyone.

    >>> [(v.name, v.share) for v in default_config("s", 0.25).experiments[0].variants]
    [('control', 0.25), ('personalized', 0.75)]
    """
    experiment = Experiment(
        name=DEFAULT_EXPERIMENT,
        layer=DEFAULT_LAYER,
        salt=salt,
        variants=(
            Variant(CONTROL, control_share, KIND_CONTROL),
            Variant(PERSONALIZED, 1.0 - control_share, KIND_RANKING),
        ),
        control=CONTROL,
        guardrails=(Guardrail("latency_ms", 0.5, False),),
    )
    return ExperimentConfig((experiment,), source="default")


def parse_config(body: Mapping[str, Any], source: str = "inline") -> ExperimentConfig:
    """Validate a configuration object; raises :class:`ConfigError` naming the bad field."""
    if not isinstance(body, Mapping) or not isinstance(body.get("experiments"), list):
        raise ConfigError("experiments: must be a list")
    experiments = [
        _parse_experiment(e, f"experiments[{n}]") for n, e in enumerate(body["experiments"])
    ]
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise ConfigError("experiments: names must be unique")
    experiments = _place_in_layers(experiments)
    _check_layers(experiments)
    return ExperimentConfig(tuple(experiments), source=source)


def load_config(path: str | os.PathLike[str]) -> ExperimentConfig:
    """Read and validate a configuration file (``ConfigError`` if it is not a valid one)."""
    try:
        with open(path, "rb") as handle:
            body = orjson.loads(handle.read())
    except orjson.JSONDecodeError as error:
        raise ConfigError(f"{path}: not JSON ({error})") from error
    return parse_config(body, source=str(path))


def _time(value: Any, where: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool):
        raise ConfigError(f"{where}: must be epoch seconds or an ISO 8601 time")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from error
    raise ConfigError(f"{where}: must be epoch seconds or an ISO 8601 time")


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: must be a number")
    if not low <= value <= high:
        raise ConfigError(f"{where}: must be within {low:g}..{high:g}")
    return float(value)


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 64 or ":" in value:
        raise ConfigError(f"{where}: must be a non-empty string of at most 64 characters, no ':'")
    return value


def _parse_variant(body: Any, where: str) -> Variant:
    if not isinstance(body, Mapping):
        raise ConfigError(f"{where}: must be an object")
    name = _name(body.get("name"), f"{where}.name")
    share = _number(body.get("share", 0.0), f"{where}.share", 0.0, 1.0)
    ranking = body.get("ranking", PERSONALIZED)
    if ranking == CONTROL:
        return Variant(name, share, KIND_CONTROL)
    if ranking == PERSONALIZED:
        return Variant(name, share, KIND_RANKING)
    if not isinstance(ranking, Mapping):
        raise ConfigError(f"{where}.ranking: 'control', 'personalized' or an object")
    if "interleave" in ranking:
        pair = ranking["interleave"]
        named = isinstance(pair, list) and all(isinstance(p, str) for p in pair)
        if not (named and len(pair) == 2):
            raise ConfigError(f"{where}.ranking.interleave: must name two variants")
        return Variant(name, share, KIND_INTERLEAVE, interleave=(pair[0], pair[1]))
    overrides: dict[str, Any] = {}
    for key, value in ranking.items():
        if key not in OVERRIDABLE:
            raise ConfigError(
                f"{where}.ranking.{key}: not a ranking setting (one of {', '.join(OVERRIDABLE)})"
            )
        if isinstance(value, bool):
            overrides[key] = value
        else:
            overrides[key] = _number(value, f"{where}.ranking.{key}", -1e9, 1e9)
    return Variant(name, share, KIND_RANKING, overrides)


def _parse_experiment(body: Any, where: str) -> Experiment:
    if not isinstance(body, Mapping):
        raise ConfigError(f"{where}: must be an object")
    name = _name(body.get("name"), f"{where}.name")
    raw_variants = body.get("variants")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise ConfigError(f"{where}.variants: must be a non-empty list")
    variants = tuple(
        _parse_variant(v, f"{where}.variants[{n}]") for n, v in enumerate(raw_variants)
    )
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.variants: names must be unique")
    total = sum(v.share for v in variants)
    if not math.isclose(total, 1.0, abs_tol=1e-6) and not math.isclose(total, 0.0):
        raise ConfigError(f"{where}.variants: shares must add up to 1 (they add up to {total:g})")
    for n, v in enumerate(variants):
        if v.kind == KIND_INTERLEAVE:
            for member in v.interleave or ():
                if member not in names or variants[names.index(member)].kind == KIND_INTERLEAVE:
                    raise ConfigError(
                        f"{where}.variants[{n}].ranking.interleave: {member!r} is not a "
                        "ranking variant of this experiment"
                    )
    control = body.get("control", names[0])
    if control not in names:
        raise ConfigError(f"{where}.control: {control!r} is not a variant")
    primary = body.get("primary_metric", "ctr")
    if primary not in METRICS:
        raise ConfigError(f"{where}.primary_metric: one of {', '.join(METRICS)}")
    guardrails = []
    for n, g in enumerate(body.get("guardrails", []) or []):
        at = f"{where}.guardrails[{n}]"
        if not isinstance(g, Mapping) or g.get("metric") not in METRICS:
            raise ConfigError(f"{at}.metric: one of {', '.join(METRICS)}")
        higher = g.get("higher_is_better", METRICS[g["metric"]][1])
        guardrails.append(
            Guardrail(
                g["metric"],
                _number(g.get("max_degradation", 0.02), f"{at}.max_degradation", 0.0, 10.0),
                bool(higher),
            )
        )
    tau = body.get("tau", {}) or {}
    if not isinstance(tau, Mapping) or any(m not in METRICS for m in tau):
        raise ConfigError(f"{where}.tau: an object of metric name to mixture scale")
    start = _time(body.get("start"), f"{where}.start", 0.0)
    stop = _time(body.get("stop"), f"{where}.stop", math.inf)
    if stop <= start:
        raise ConfigError(f"{where}.stop: must be after start")
    layer_range = body.get("range")
    if layer_range is not None:
        if not (isinstance(layer_range, list) and len(layer_range) == 2):
            raise ConfigError(f"{where}.range: [from, to] within 0..1")
        low = _number(layer_range[0], f"{where}.range[0]", 0.0, 1.0)
        high = _number(layer_range[1], f"{where}.range[1]", 0.0, 1.0)
        if high <= low:
            raise ConfigError(f"{where}.range: [from, to] with from < to")
        layer_range = (low, high)
    traffic = _number(body.get("traffic", 1.0), f"{where}.traffic", 0.0, 1.0)
    cuped = body.get("cuped") or {}
    return Experiment(
        name=name,
        variants=variants,
        layer=_name(body.get("layer", DEFAULT_LAYER), f"{where}.layer"),
        salt=str(body.get("salt") or name),
        start=start,
        stop=stop,
        # A range of None is placed after the layer's earlier experiments (_place_in_layers).
        layer_range=layer_range if layer_range is not None else (-1.0, traffic),
        control=control,
        primary_metric=primary,
        guardrails=tuple(guardrails),
        alpha=_number(body.get("alpha", 0.05), f"{where}.alpha", 1e-6, 0.5),
        k=int(_number(body.get("k", 5), f"{where}.k", 1, 1000)),
        tau={m: _number(t, f"{where}.tau.{m}", 1e-9, 1e9) for m, t in tau.items()},
        cuped_pre_experiment=str(cuped.get("pre_experiment", "")) if cuped else "",
    )


def _place_in_layers(experiments: list[Experiment]) -> list[Experiment]:
    """Give experiments without an explicit ``range`` the next ``traffic`` of their layer.

    Ranges follow the order of the file: appending an experiment moves no user, removing
    or reordering one does (give ``range`` explicitly to keep assignments put).
    """
    taken: dict[str, float] = {}
    placed = []
    for e in experiments:
        low, high = e.layer_range
        if low < 0:  # a traffic share to place
            start = taken.get(e.layer, 0.0)
            if start + high > 1.0 + 1e-9:
                raise ConfigError(f"{e.name}: layer {e.layer!r} has no traffic left")
            e = replace(e, layer_range=(start, min(start + high, 1.0)))
        taken[e.layer] = max(taken.get(e.layer, 0.0), e.layer_range[1])
        placed.append(e)
    return placed


def _check_layers(experiments: list[Experiment]) -> None:
    by_layer: dict[str, list[Experiment]] = {}
    for e in experiments:
        by_layer.setdefault(e.layer, []).append(e)
    for layer, members in by_layer.items():
        spans = sorted(members, key=lambda e: e.layer_range)
        for a, b in zip(spans, spans[1:], strict=False):
            if b.layer_range[0] < a.layer_range[1] - 1e-12:
                raise ConfigError(f"layer {layer!r}: {a.name} and {b.name} overlap")
    # Orthogonal layers must not pull the same knob: the ranking a user gets would depend on
    # the order in which the layers are applied.
    owner: dict[str, str] = {}
    for e in experiments:
        for v in e.variants:
            for knob in v.overrides:
                if owner.setdefault(knob, e.layer) != e.layer:
                    raise ConfigError(
                        f"{e.name}: {knob!r} is changed in layers {owner[knob]!r} and {e.layer!r}"
                    )
    layers = {e.layer for e in experiments if e.interleaved}
    if len(layers) > 1:
        raise ConfigError(f"interleaving experiments must share one layer, not {sorted(layers)}")


class ConfigWatcher:
    """Reloads the configuration file when its modification time changes.

    :meth:`poll` returns the new configuration, or ``None`` when nothing changed; a file that
    cannot be read or is not a valid configuration keeps the previous one, and :attr:`error`
    says why (the worker logs it once per change).

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "experiments.json"
    >>> watcher = ConfigWatcher(path, default_config())
    >>> watcher.poll() is None, watcher.error  # no file yet: the default stays
    (True, None)
    >>> _ = path.write_text('{"experiments": []}')
    >>> watcher.poll().experiments, watcher.current.source == str(path)
    ((), True)
    >>> _ = path.write_text('{"experiments": 3}'); os.utime(path, (1, 1))
    >>> watcher.poll() is None, watcher.error
    (True, 'experiments: must be a list')
    """

    def __init__(
        self, path: str | os.PathLike[str] | None, initial: ExperimentConfig | None = None
    ) -> None:
        self.path = path
        self.current = initial or default_config()
        self.error: str | None = None
        self._seen: float | None = None

    def poll(self) -> ExperimentConfig | None:
        if not self.path:
            return None
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            return None
        if mtime == self._seen:
            return None
        self._seen = mtime
        try:
            config = load_config(self.path)
        except (OSError, ConfigError) as error:
            self.error = str(error)
            return None
        self.error = None
        self.current = config
        return config
