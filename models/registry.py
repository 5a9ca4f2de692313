"""The versioned registry of deep CTR models, in the state store (Redis in production).

The trainer publishes each accepted candidate as a new version, which becomes the
serving one; an operator can list versions, promote an older one or roll back
(``streamrank model list|promote|rollback``). Rankers follow the serving version
with a :class:`DeepModelWatcher`: one small read per poll, and the model itself
only when the version changed.

Layout (keys after the store's prefix):

- ``m:deep:index``: JSON with every retained version (created time, metrics,
  training window, size, digest, slot), the serving version and the history of
  earlier serving versions that :meth:`ModelRegistry.rollback` returns to.
- ``m:deep:serving``: the serving version number alone, for cheap polls.
- ``m:deep:w:{slot}``: the model bytes (safetensors), in one of ``keep`` slots:
  a new version overwrites the slot of the oldest one that is not serving, so the
  registry never holds more than ``keep * max_bytes`` bytes, with no deletes.

Each change commits atomically with the index, guarded by a one-time claim of its
revision number: two writers (the trainer, an operator) never overwrite each other's
change; the loser re-reads and retries.

>>> from engine.store import MemoryStore
>>> registry = ModelRegistry(MemoryStore(), keep=2)
>>> [registry.publish(b"model-%d" % i, {"auc": 0.7}, (0.0, 1.0)) for i in range(3)]
[1, 2, 3]
>>> [v["version"] for v in registry.list()], registry.serving_version()
([2, 3], 3)
>>> registry.rollback(), registry.serving_version()
(2, 2)
>>> registry.read_blob(2)
b'model-1'
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from hashlib import blake2b

import orjson

from engine.store import Batch, BlobRead, PutBlob, Store
from models.deep_ctr import MAX_MODEL_BYTES, DeepCTR

INDEX_KEY = "m:deep:index"
SERVING_KEY = "m:deep:serving"
BLOB_KEY = "m:deep:w:{slot}"
REVISION_KEY = "m:deep:rev:{revision}"

log = logging.getLogger(__name__)


class RegistryConflict(RuntimeError):
    """Another writer kept changing the registry; the change was not applied."""


class ModelRegistry:
    """Versions of the deep model with their metrics, and which one is serving.

    Parameters
    ----------
    store
        Any :class:`~engine.store.Store` (``MemoryStore`` in tests, ``RedisStore`` in production).
    keep
        Versions retained (the serving one always is); older blobs are overwritten.
    max_bytes
        Largest model accepted.
    history
        Earlier serving versions remembered for rollback.
    """

    def __init__(
        self,
        store: Store,
        keep: int = 5,
        max_bytes: int = MAX_MODEL_BYTES,
        history: int = 20,
        clock: Callable[[], float] = time.time,
        revision_ttl_s: int = 30 * 86400,
    ) -> None:
        if keep < 2:
            raise ValueError("keep at least 2 versions, so that one can roll back")
        self.store = store
        self.keep = keep
        self.max_bytes = max_bytes
        self.history = history
        self.clock = clock
        self.revision_ttl_s = revision_ttl_s

    # --- reading -------------------------------------------------------------------------

    def _index(self) -> dict:
        (raw,) = self.store.read([BlobRead(INDEX_KEY)])
        if not raw:
            return {"revision": 0, "next": 1, "versions": [], "serving": None, "history": []}
        return orjson.loads(raw)

    def list(self) -> list[dict]:
        """Retained versions, oldest first, each with ``serving`` saying whether it serves."""
        index = self._index()
        return [
            {**entry, "serving": entry["version"] == index["serving"]}
            for entry in index["versions"]
        ]

    def serving_version(self) -> int | None:
        """The serving version (one small read), or ``None`` before the first publish."""
        (raw,) = self.store.read([BlobRead(SERVING_KEY)])
        return int(raw) if raw else None

    def read_blob(self, version: int) -> bytes:
        """The bytes of a retained version, checked against the digest it was published with."""
        entry = self._entry(self._index(), version)
        (blob,) = self.store.read([BlobRead(BLOB_KEY.format(slot=entry["slot"]))])
        if blob is None or _digest(blob) != entry["digest"]:
            raise LookupError(f"model version {version} was replaced while being read")
        return blob

    def load(self, version: int | None = None) -> DeepCTR:
        """The model of ``version`` (default: the serving one), verified and ready to score."""
        if version is None:
            version = self.serving_version()
            if version is None:
                raise LookupError("no model version is serving")
        model = DeepCTR.from_bytes(self.read_blob(version), max_bytes=self.max_bytes)
        model.version = version
        return model

    @staticmethod
    def _entry(index: Mapping, version: int) -> dict:
        for entry in index["versions"]:
            if entry["version"] == version:
                return entry
        raise LookupError(f"model version {version} is not in the registry")

    # --- changing ------------------------------------------------------------------------

    def publish(
        self,
        model_bytes: bytes,
        metrics: Mapping,
        window: Sequence[float],
        serve: bool = True,
    ) -> int:
        """Store a new version (and serve it, by default); returns its number."""
        if len(model_bytes) > self.max_bytes:
            raise ValueError(
                f"model of {len(model_bytes)} bytes is over the {self.max_bytes} bound"
            )
        published: list[int] = []

        def change(index: dict) -> list[PutBlob]:
            version = index["next"]
            entry = {
                "version": version,
                "created": self.clock(),
                "metrics": dict(metrics),
                "window": [float(t) for t in window],
                "size": len(model_bytes),
                "digest": _digest(model_bytes),
            }
            used = {e["slot"] for e in index["versions"]}
            versions = list(index["versions"])
            while len(versions) >= self.keep:
                evicted = next(e for e in versions if e["version"] != index["serving"])
                versions.remove(evicted)
                used.discard(evicted["slot"])
            entry["slot"] = min(set(range(self.keep)) - used)
            index.update(next=version + 1, versions=[*versions, entry])
            if serve:
                self._serve(index, version)
            published[:] = [version]
            return [PutBlob(BLOB_KEY.format(slot=entry["slot"]), model_bytes)]

        self._commit(change)
        return published[0]

    def promote(self, version: int) -> int:
        """Serve a retained version; the current one goes on the rollback history."""

        def change(index: dict) -> list[PutBlob]:
            self._entry(index, version)
            self._serve(index, version)
            return []

        self._commit(change)
        return version

    def rollback(self) -> int:
        """Serve again the previous serving version that is still retained; returns it."""
        chosen: list[int] = []

        def change(index: dict) -> list[PutBlob]:
            retained = {e["version"] for e in index["versions"]}
            history = list(index["history"])
            while history:
                version = history.pop()
                if version in retained and version != index["serving"]:
                    chosen[:] = [version]
                    index.update(serving=version, history=history)
                    return []
            raise LookupError("no earlier serving version is retained")
            return []

        self._commit(change)
        return chosen[0]

    def _serve(self, index: dict, version: int) -> None:
        if index["serving"] is not None and index["serving"] != version:
            index["history"] = [*index["history"], index["serving"]][-self.history :]
        index["serving"] = version

    def _commit(self, change: Callable[[dict], list[PutBlob]], attempts: int = 5) -> None:
        for _ in range(attempts):
            index = self._index()
            revision = index["revision"] + 1
            writes = change(index)
            index["revision"] = revision
            serving = b"" if index["serving"] is None else str(index["serving"]).encode()
            writes += [PutBlob(INDEX_KEY, orjson.dumps(index)), PutBlob(SERVING_KEY, serving)]
            claim = REVISION_KEY.format(revision=revision)
            if self.store.apply_many([Batch(writes, claim, self.revision_ttl_s)])[0]:
                return
        raise RegistryConflict("the model registry kept changing under this write")


def _digest(blob: bytes) -> str:
    return blake2b(blob, digest_size=16).hexdigest()


class DeepModelWatcher:
    """Follows the serving deep model: ``poll()`` returns a newly served model or ``None``.

    A poll is one small read; the model is loaded only when the serving version
    changed (a promotion or rollback counts too). A version that cannot be loaded
    (replaced while read, refused as malformed) is logged and retried at the next poll,
    and the ranker keeps what it has. Poll from a background thread or timer and swap
    the returned model in with one assignment.

    >>> import torch
    >>> from engine.store import MemoryStore
    >>> from models.deep_ctr import DeepConfig
    >>> _ = torch.manual_seed(0)
    >>> registry = ModelRegistry(MemoryStore())
    >>> watcher = DeepModelWatcher(registry)
    >>> watcher.poll() is None
    True
    >>> tiny = DeepConfig(user_buckets=4, item_buckets=4, category_buckets=4, brand_buckets=4,
    ...                   query_buckets=4)
    >>> registry.publish(DeepCTR(tiny).to_bytes(), {"auc": 0.7}, (0.0, 1.0))
    1
    >>> watcher.poll().version, watcher.poll()
    (1, None)
    """

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.version: int | None = None

    def poll(self) -> DeepCTR | None:
        version = self.registry.serving_version()
        if version is None or version == self.version:
            return None
        try:
            model = self.registry.load(version)
        except (LookupError, ValueError) as error:
            log.warning("deep model version %s not loaded: %s", version, error)
            return None
        self.version = version
        return model
