"""The single writer of the online model, and how rankers follow its versions.

:class:`OnlineLearner` learns every labelled example once (examples carry the id
of the event they came from; a redelivered batch is skipped) and publishes a
versioned :class:`~models.online_ctr.LinearCTR` snapshot to the store at most
every ``publish_every_s`` seconds. :class:`SnapshotWatcher` is what each ranker
polls: one small read of the version, and the snapshot itself only when it
changed. A restarted learner resumes from the last published snapshot.

>>> from engine.store import MemoryStore
>>> from engine.features import FEATURE_NAMES
>>> store = MemoryStore()
>>> learner = OnlineLearner(store, publish_every_s=0.0, warmup_examples=1)
>>> watcher = SnapshotWatcher(store)
>>> example = LabelledExample("r-1", "i-1", 1, True, (0.5,) * len(FEATURE_NAMES), 0.0)
>>> learner.learn("e-1", [example]), learner.learn("e-1", [example])  # the second is a replay
(1, 0)
>>> learner.publish_if_due(now=1.0), watcher.poll().version
(True, 1)
>>> watcher.poll() is None  # nothing new
True
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.features import FEATURE_NAMES
from engine.impressions import LabelledExample
from engine.store import Batch, BlobRead, PutBlob, Store
from models.online_ctr import LinearCTR, OnlineCTR

SNAPSHOT_KEY = "m:online"
VERSION_KEY = "m:online:v"


def latest_snapshot(store: Store) -> LinearCTR | None:
    (blob,) = store.read([BlobRead(SNAPSHOT_KEY)])
    return LinearCTR.from_bytes(blob) if blob else None


class OnlineLearner:
    """Learns examples once each and publishes snapshots of the model."""

    def __init__(
        self,
        store: Store,
        publish_every_s: float = 0.5,
        dedup_ttl_s: int = 7 * 86400,
        **model_options: Any,
    ) -> None:
        """``model_options`` go to :class:`~models.online_ctr.OnlineCTR` (learning rate, ...)."""
        self.store = store
        self.publish_every_s = publish_every_s
        self.dedup_ttl_s = dedup_ttl_s
        start = latest_snapshot(store)
        self.model = OnlineCTR(start=start, **model_options)
        self.version = start.version if start else 0
        self._published_at = 0.0
        self._unpublished = 0

    def learn(self, source_id: str, examples: Sequence[LabelledExample]) -> int:
        """Learn the examples of one source event unless they were learned before."""
        return len(self.learn_many([(source_id, examples)]))

    def learn_many(
        self, sources: Sequence[tuple[str, Sequence[LabelledExample]]]
    ) -> list[LabelledExample]:
        """Learn the examples of several source events, each once, with one claim round trip.

        Returns the examples learned now (none of a source learned before), so that
        whatever else learns from them (the deep model's window) sees each once too.
        """
        # A non-finite feature would poison the scaler's statistics for good: never learn it.
        # Examples of impressions ranked before features were added (an upgrade) have fewer
        # columns: the new ones, appended last, are 0 for them ("no signal").
        width = len(FEATURE_NAMES)
        kept = [
            (
                source_id,
                [
                    _widened(e, width)
                    for e in examples
                    if len(e.features) <= width and all(map(math.isfinite, e.features))
                ],
            )
            for source_id, examples in sources
        ]
        kept = [(source_id, examples) for source_id, examples in kept if examples]
        if not kept:
            return []
        claimed = self.store.apply_many(
            [Batch([], f"lx:{source_id}", self.dedup_ttl_s) for source_id, _ in kept]
        )
        fresh = [
            e for (_, examples), new in zip(kept, claimed, strict=True) if new for e in examples
        ]
        if not fresh:
            return []
        self.model.learn_many(np.array([e.features for e in fresh]), [e.clicked for e in fresh])
        self._unpublished += len(fresh)
        return fresh

    def publish_if_due(self, now: float | None = None) -> bool:
        """Publish a new version if anything was learned and the last one is old enough."""
        now = time.monotonic() if now is None else now
        if not self._unpublished or now - self._published_at < self.publish_every_s:
            return False
        if not self.model.ready():
            return False
        snapshot = self.model.snapshot(self.version + 1)
        if not (np.isfinite(snapshot.weights).all() and np.isfinite(snapshot.intercept)):
            # A diverged model is never served; keep the last good version.
            return False
        self.store.apply(
            [
                PutBlob(SNAPSHOT_KEY, snapshot.to_bytes()),
                PutBlob(VERSION_KEY, str(snapshot.version).encode()),
            ]
        )
        self.version = snapshot.version
        self._published_at = now
        self._unpublished = 0
        return True


class SnapshotWatcher:
    """Follows the published online model: ``poll()`` returns a new snapshot or ``None``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.version: int | None = None

    def poll(self) -> LinearCTR | None:
        (raw_version,) = self.store.read([BlobRead(VERSION_KEY)])
        if raw_version is None or int(raw_version) == self.version:
            return None
        snapshot = latest_snapshot(self.store)
        if snapshot is None:
            return None
        self.version = snapshot.version
        return snapshot


def _widened(example: LabelledExample, width: int) -> LabelledExample:
    missing = width - len(example.features)
    if missing <= 0:
        return example
    return dataclasses.replace(example, features=(*example.features, *(0.0,) * missing))
