"""The tuned knobs of ranking and online learning, kept in one JSON file.

``streamrank tune`` writes a profile; ``streamrank replay --profile FILE`` and
the workers (``STREAMRANK_PROFILE=FILE``) read it, so the configuration judged
offline is the one that serves. Only the knobs below may appear: a typo is an
error, not a silently ignored setting.

>>> profile = RankingProfile.from_dict({"online_learning_rate": 0.1})
>>> profile.online_learning_rate, profile.retrieval_weight
(0.1, 0.01)
>>> RankingProfile.from_dict({"learning_rate": 0.1})
Traceback (most recent call last):
...
ValueError: unknown profile key 'learning_rate'; expected one of retrieval_weight, ...
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import orjson

OPTIMIZERS = ("ftrl", "sgd", "adam")


@dataclass(frozen=True)
class RankingProfile:
    """How a ranker blends and how the online model learns."""

    retrieval_weight: float = 0.01
    # Share of the deep model in the CTR estimate once one serves (0: the online model alone).
    deep_weight: float = 0.25
    online_learning_rate: float = 0.05
    online_l2: float = 1e-4
    online_optimizer: str = "ftrl"
    online_standardize: bool = True
    # MMR diversity over category and brand (engine.diversity): its relevance weight in
    # [0, 1], 1 = the score order; None: no diversity step.
    diversity: float | None = None

    def __post_init__(self) -> None:
        for name in ("retrieval_weight", "deep_weight", "online_learning_rate", "online_l2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name}: must be a number")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: must be a finite number >= 0")
        if self.deep_weight > 1:
            raise ValueError("deep_weight: must be between 0 and 1")
        if self.online_optimizer not in OPTIMIZERS:
            raise ValueError(f"online_optimizer: must be one of {', '.join(OPTIMIZERS)}")
        if not isinstance(self.online_standardize, bool):
            raise ValueError("online_standardize: must be true or false")
        if self.diversity is not None and (
            isinstance(self.diversity, bool)
            or not isinstance(self.diversity, int | float)
            or not 0 <= self.diversity <= 1
        ):
            raise ValueError("diversity: must be null or a number between 0 and 1")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RankingProfile:
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                raise ValueError(f"unknown profile key {key!r}; expected one of {', '.join(known)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> RankingProfile:
        """Read a profile; a file may hold ``{"profile": {...}, ...}`` as tune writes it."""
        document = orjson.loads(Path(path).read_bytes())
        if not isinstance(document, dict):
            raise ValueError(f"{path}: a profile is a JSON object")
        return cls.from_dict(document.get("profile", document))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def learner_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~models.online_ctr.OnlineCTR`."""
        return {
            "learning_rate": self.online_learning_rate,
            "l2": self.online_l2,
            "optimizer": self.online_optimizer,
            "standardize": self.online_standardize,
        }
