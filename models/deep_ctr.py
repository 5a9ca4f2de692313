"""The deep click-through-rate model: a small DCN-v2 over hashed ids and the ranking features.

Where the online model (:mod:`models.online_ctr`) sees only the 21 dense engine
features, this one also sees *who*, *what* and *for which words*: the user, the
item, its category and brand, and the query's tokens, each as a learned
embedding. It is retrained periodically (:mod:`models.deep_trainer`), published
through :mod:`models.registry`, and scores all candidates of a request in one
batched, no-grad forward pass.

Why DCN-v2 (a cross network beside a deep MLP, Wang et al. 2021): its cross
layers learn bounded-degree feature crosses (user x category, query token x
brand) explicitly, at the cost of one small matrix per layer, and the deep part
catches the rest. Wide & Deep needs hand-made crosses and DeepFM only
second-order ones; at the sizes used here all three score 100 candidates in a
fraction of a millisecond, so the choice rests on accuracy (``streamrank/deep_replay.py``).

Memory is bounded by construction: ids are hashed (BLAKE2b, stable across
processes, unlike ``hash()``) into a fixed number of buckets per field, so an
unseen id costs nothing and the tables never grow. The dense features are
standardized with statistics stored in the model (buffers), so they travel
with the weights. Weights are saved with safetensors plus a small JSON header:
no pickle, and :meth:`DeepCTR.from_bytes` refuses oversized blobs, unknown
shapes and non-finite values.

>>> import torch
>>> _ = torch.manual_seed(0)
>>> from engine.features import FEATURE_NAMES
>>> model = DeepCTR(DeepConfig(user_buckets=64, item_buckets=64, category_buckets=8,
...                            brand_buckets=8, query_buckets=32))
>>> rows = model.encode_request(
...     "u-1", "red shoes", ["i-1", "i-2"], ["shoes", "bags"], ["acme", ""],
...     [[0.0] * len(FEATURE_NAMES)] * 2)
>>> p = model.predict_proba_many(rows)
>>> p.shape, bool(((p > 0) & (p < 1)).all())
((2,), True)
>>> copy = DeepCTR.from_bytes(model.to_bytes())
>>> bool((copy.predict_proba_many(rows) == p).all())
True
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from hashlib import blake2b

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from engine.features import FEATURE_NAMES
from engine.impressions import LabelledExample

# A published model is at most this large (the default config saves to about 9.2 MB).
MAX_MODEL_BYTES = 16 * 1024 * 1024
HEADER_KEY = "streamrank"
FORMAT = "streamrank-deep-ctr/2"  # /2: the user-item factorization term


@dataclass(frozen=True)
class DeepConfig:
    """Sizes of the model. Buckets bound the embedding tables; ``query_tokens`` the pooling."""

    user_buckets: int = 2**16
    item_buckets: int = 2**16
    category_buckets: int = 2**12
    brand_buckets: int = 2**12
    query_buckets: int = 2**14
    query_tokens: int = 8
    embedding_dim: int = 8
    factors: int = 8  # length of the user and item vectors of the factorization term
    cross_layers: int = 2
    hidden: tuple[int, ...] = (64, 32)
    dense_features: tuple[str, ...] = FEATURE_NAMES

    @classmethod
    def from_dict(cls, body: Mapping) -> DeepConfig:
        """A config from its JSON form, refusing unknown fields and absurd sizes."""
        known = set(cls.__dataclass_fields__)
        if not isinstance(body, Mapping) or set(body) - known:
            raise ValueError(f"malformed model config {body!r}")
        values = dict(body)
        for name in ("hidden", "dense_features"):
            if name in values:
                values[name] = tuple(values[name])
        config = cls(**values)
        sizes = [
            config.user_buckets,
            config.item_buckets,
            config.category_buckets,
            config.brand_buckets,
            config.query_buckets,
        ]
        small = (
            all(isinstance(n, int) and 2 <= n <= 2**22 for n in sizes)
            and 1 <= config.query_tokens <= 64
            and 1 <= config.embedding_dim <= 128
            and 1 <= config.factors <= 128
            and 0 <= config.cross_layers <= 8
            and all(isinstance(h, int) and 1 <= h <= 4096 for h in config.hidden)
            and len(config.hidden) <= 8
        )
        if not small:
            raise ValueError(f"model config out of bounds {body!r}")
        return config


@lru_cache(maxsize=1 << 17)
def bucket(field_name: str, value: str, buckets: int) -> int:
    """Stable hash bucket of ``value`` in ``[1, buckets)``; 0 is kept for padding.

    >>> bucket("item", "i-7", 1024) == bucket("item", "i-7", 1024)
    True
    """
    digest = blake2b(f"{field_name}\x1f{value}".encode(), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % (buckets - 1)


def query_buckets(query: str, config: DeepConfig) -> list[int]:
    """The query's tokens as buckets, padded with 0 to ``config.query_tokens``."""
    tokens = [bucket("q", t, config.query_buckets) for t in query.lower().split()]
    tokens = tokens[: config.query_tokens]
    return tokens + [0] * (config.query_tokens - len(tokens))


@dataclass
class DeepRows:
    """Encoded model input: hashed ids and raw dense features of a batch of candidates."""

    user: np.ndarray
    item: np.ndarray
    category: np.ndarray
    brand: np.ndarray
    query: np.ndarray  # (n, query_tokens), 0 = padding
    dense: np.ndarray  # (n, len(dense_features)), raw
    clicked: np.ndarray | None = field(default=None)

    def __len__(self) -> int:
        return len(self.item)

    def take(self, index: np.ndarray) -> DeepRows:
        return DeepRows(
            self.user[index],
            self.item[index],
            self.category[index],
            self.brand[index],
            self.query[index],
            self.dense[index],
            None if self.clicked is None else self.clicked[index],
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (
            torch.from_numpy(self.user),
            torch.from_numpy(self.item),
            torch.from_numpy(self.category),
            torch.from_numpy(self.brand),
            torch.from_numpy(self.query),
            torch.from_numpy(self.dense),
        )


class DCNv2(nn.Module):
    """Embeddings + standardized dense input, a cross network and an MLP side by side.

    The logit also has a factorization term, the dot product of a user's and an item's
    factor vectors: what collaborative filtering learns (shoppers who engage the same
    items get near vectors), explicit because the cross network and the MLP alone
    hardly learn a pure user-by-item pattern (``tests/test_deep_ctr.py``), and readable
    as the user-item affinity. A new user's hash bucket holds a vector no one trained,
    zero, so the term is 0 and the session and popularity features decide.
    """

    def __init__(self, config: DeepConfig) -> None:
        super().__init__()
        d = config.embedding_dim
        n_dense = len(config.dense_features)
        self.user = nn.Embedding(config.user_buckets, d)
        self.item = nn.Embedding(config.item_buckets, d)
        self.category = nn.Embedding(config.category_buckets, d)
        self.brand = nn.Embedding(config.brand_buckets, d)
        self.query = nn.EmbeddingBag(config.query_buckets, d, mode="mean", padding_idx=0)
        for table in (self.user, self.item, self.category, self.brand, self.query):
            nn.init.normal_(table.weight, std=0.01)
        # The factorization's own vectors. Users start at zero, so that a shopper no one
        # trained has no affinity at all; items start larger than the other embeddings,
        # as the term's gradient for a user is the item's vector.
        self.user_factors = nn.Embedding(config.user_buckets, config.factors)
        self.item_factors = nn.Embedding(config.item_buckets, config.factors)
        nn.init.zeros_(self.user_factors.weight)
        nn.init.normal_(self.item_factors.weight, std=0.1)
        self.register_buffer("dense_mean", torch.zeros(n_dense))
        self.register_buffer("dense_std", torch.ones(n_dense))
        width = 5 * d + n_dense
        self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(config.cross_layers))
        for layer in self.cross:
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        layers: list[nn.Module] = []
        previous = width
        for size in config.hidden:
            layers += [nn.Linear(previous, size), nn.ReLU()]
            previous = size
        self.deep = nn.Sequential(*layers)
        self.out = nn.Linear(width + previous, 1)

    def forward(self, user, item, category, brand, query, dense) -> torch.Tensor:
        scaled = ((dense - self.dense_mean) / self.dense_std).clamp(-5.0, 5.0)
        x0 = torch.cat(
            [
                self.user(user),
                self.item(item),
                self.category(category),
                self.brand(brand),
                self.query(query),
                scaled,
            ],
            dim=1,
        )
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        logit = self.out(torch.cat([x, self.deep(x0)], dim=1)).squeeze(1)
        return logit + self.affinity(user, item)

    def affinity(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """The factorization term: user factors . item factors, per row."""
        return (self.user_factors(user) * self.item_factors(item)).sum(dim=1)


class RequestScorer:
    """The network's forward pass for one request's candidates, in NumPy on frozen weights.

    A request has one user and one query: their vectors are looked up once. The cross
    layers and the MLP are a few small matrix products, where NumPy's per-call cost is a
    fraction of PyTorch's; ``tests/test_deep_ctr.py`` checks both give the same numbers.
    """

    def __init__(self, network: DCNv2) -> None:
        w = {k: v.detach().cpu().numpy().copy() for k, v in network.state_dict().items()}
        self.user, self.item = w["user.weight"], w["item.weight"]
        self.category, self.brand, self.query = (
            w["category.weight"],
            w["brand.weight"],
            w["query.weight"],
        )
        self.user_factors, self.item_factors = w["user_factors.weight"], w["item_factors.weight"]
        self.mean, self.std = w["dense_mean"], w["dense_std"]
        self.cross = [
            (w[f"cross.{n}.weight"].T.copy(), w[f"cross.{n}.bias"])
            for n in range(len(network.cross))
        ]
        linear = [n for n, layer in enumerate(network.deep) if isinstance(layer, nn.Linear)]
        self.deep = [(w[f"deep.{n}.weight"].T.copy(), w[f"deep.{n}.bias"]) for n in linear]
        self.out_weight, self.out_bias = w["out.weight"][0], float(w["out.bias"][0])

    def predict(self, rows: DeepRows) -> np.ndarray:
        n = len(rows)
        user = int(rows.user[0])
        tokens = rows.query[0][rows.query[0] != 0]  # EmbeddingBag's mean skips the padding
        query = (
            self.query[tokens].mean(axis=0)
            if len(tokens)
            else np.zeros(self.query.shape[1], np.float32)
        )
        scaled = np.clip((rows.dense - self.mean) / self.std, -5.0, 5.0)
        x0 = np.concatenate(
            [
                np.broadcast_to(self.user[user], (n, self.user.shape[1])),
                self.item[rows.item],
                self.category[rows.category],
                self.brand[rows.brand],
                np.broadcast_to(query, (n, query.shape[0])),
                scaled,
            ],
            axis=1,
        )
        x = x0
        for weight, bias in self.cross:
            x = x0 * (x @ weight + bias) + x
        hidden = x0
        for weight, bias in self.deep:
            hidden = np.maximum(hidden @ weight + bias, 0.0)
        logit = np.concatenate([x, hidden], axis=1) @ self.out_weight + self.out_bias
        logit = logit + self.item_factors[rows.item] @ self.user_factors[user]
        return 1.0 / (1.0 + np.exp(-logit.astype(np.float64)))


class DeepCTR:
    """A DCN-v2 CTR model with its config, version and metrics; what rankers score with.

    Parameters
    ----------
    config
        Sizes (:class:`DeepConfig`); the defaults hold about 2.3 M parameters (9.2 MB saved).
    version
        Registry version, 0 until published.
    metrics
        Held-out metrics and training window, as the trainer measured them.
    """

    def __init__(
        self,
        config: DeepConfig | None = None,
        version: int = 0,
        metrics: Mapping | None = None,
        network: DCNv2 | None = None,
    ) -> None:
        self.config = config or DeepConfig()
        self.version = version
        self.metrics = dict(metrics or {})
        self.network = network or DCNv2(self.config)
        self.network.eval()
        # Built at the first request scored: a served model's weights no longer change.
        self._scorer: RequestScorer | None = None

    # --- input -----------------------------------------------------------------------------

    def encode(self, examples: Sequence[LabelledExample]) -> DeepRows:
        """Rows for labelled examples (training and validation)."""
        c = self.config
        return DeepRows(
            user=np.array([bucket("u", e.user_id, c.user_buckets) for e in examples]),
            item=np.array([bucket("i", e.item_id, c.item_buckets) for e in examples]),
            category=np.array([bucket("c", e.category, c.category_buckets) for e in examples]),
            brand=np.array([bucket("b", e.brand, c.brand_buckets) for e in examples]),
            query=np.array([query_buckets(e.query, c) for e in examples], dtype=np.int64).reshape(
                len(examples), c.query_tokens
            ),
            dense=np.array([e.features for e in examples], dtype=np.float32).reshape(
                len(examples), len(c.dense_features)
            ),
            clicked=np.array([e.clicked for e in examples], dtype=np.float32),
        )

    def encode_request(
        self,
        user_id: str,
        query: str,
        item_ids: Sequence[str],
        categories: Sequence[str],
        brands: Sequence[str],
        features: np.ndarray | Sequence[Sequence[float]],
    ) -> DeepRows:
        """Rows for the candidates of one request (user and query hashed once)."""
        c = self.config
        n = len(item_ids)
        dense = np.asarray(features, dtype=np.float32).reshape(n, -1) if n else None
        if dense is None:
            dense = np.zeros((0, len(c.dense_features)), dtype=np.float32)
        elif dense.shape[1] != len(c.dense_features):
            # A model trained before features were added: its own columns, by name.
            dense = dense[:, [FEATURE_NAMES.index(name) for name in c.dense_features]]
        return DeepRows(
            user=np.full(n, bucket("u", user_id, c.user_buckets), dtype=np.int64),
            item=np.array([bucket("i", i, c.item_buckets) for i in item_ids], dtype=np.int64),
            category=np.array(
                [bucket("c", x, c.category_buckets) for x in categories], dtype=np.int64
            ),
            brand=np.array([bucket("b", x, c.brand_buckets) for x in brands], dtype=np.int64),
            query=np.tile(np.array(query_buckets(query, c), dtype=np.int64), (n, 1)),
            dense=dense,
        )

    # --- scoring ---------------------------------------------------------------------------

    def predict_request(
        self,
        user_id: str,
        query: str,
        item_ids: Sequence[str],
        categories: Sequence[str],
        brands: Sequence[str],
        features: np.ndarray,
    ) -> np.ndarray:
        """Click probability of each candidate of one request (what the ranker calls).

        The same numbers as scoring :meth:`encode_request`'s rows with the network, computed
        with NumPy on a frozen copy of the weights (:class:`RequestScorer`): at these sizes
        PyTorch's per-operation overhead is most of the time.
        """
        rows = self.encode_request(user_id, query, item_ids, categories, brands, features)
        if not len(rows):
            return np.zeros(0)
        if self._scorer is None:
            self._scorer = RequestScorer(self.network)
        return self._scorer.predict(rows)

    def predict_proba_many(self, rows: DeepRows | Sequence[LabelledExample]) -> np.ndarray:
        """Click probability of every row, in one batched no-grad forward pass."""
        if not isinstance(rows, DeepRows):
            rows = self.encode(rows)
        if not len(rows):
            return np.zeros(0)
        with torch.inference_mode():
            logits = self.network(*rows.tensors())
        return torch.sigmoid(logits).double().numpy()

    def user_item_affinity(self, user_id: str, item_ids: Sequence[str]) -> np.ndarray:
        """The factorization term of each item's log-odds for the user: their affinity."""
        c = self.config
        user = torch.full((len(item_ids),), bucket("u", user_id, c.user_buckets))
        item = torch.tensor([bucket("i", i, c.item_buckets) for i in item_ids], dtype=torch.long)
        with torch.inference_mode():
            return self.network.affinity(user, item).double().numpy()

    def is_finite(self) -> bool:
        """Whether every weight and statistic is a finite number."""
        return all(bool(torch.isfinite(t).all()) for t in self.network.state_dict().values())

    # --- storage ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """safetensors bytes; config, version and metrics in its JSON metadata."""
        header = {
            "format": FORMAT,
            "config": asdict(self.config),
            "version": self.version,
            "metrics": self.metrics,
        }
        state = {k: v.detach().contiguous() for k, v in self.network.state_dict().items()}
        return save_tensors(state, metadata={HEADER_KEY: json.dumps(header)})

    @classmethod
    def from_bytes(cls, blob: bytes, max_bytes: int = MAX_MODEL_BYTES) -> DeepCTR:
        """Load a saved model; refuse anything oversized, malformed or not finite."""
        if len(blob) > max_bytes:
            raise ValueError(f"deep model of {len(blob)} bytes is over the {max_bytes} bound")
        header = read_header(blob)
        try:
            config = DeepConfig.from_dict(header["config"])
            version = int(header["version"])
            metrics = header.get("metrics") or {}
            if header.get("format") != FORMAT or not isinstance(metrics, dict):
                raise ValueError("unknown format")
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"malformed deep model header ({error!r})") from None
        with torch.device("meta"):  # shapes first, without allocating the tables
            expected = {k: tuple(v.shape) for k, v in DCNv2(config).state_dict().items()}
        try:
            state = load_tensors(blob)
        except Exception as error:  # safetensors raises its own error type
            raise ValueError(f"malformed deep model tensors ({error})") from None
        found = {k: tuple(v.shape) for k, v in state.items()}
        if found != expected:
            raise ValueError("deep model tensors do not match its config")
        if not all(
            v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in state.values()
        ):
            raise ValueError("deep model has non-finite or non-float32 weights")
        network = DCNv2(config)
        network.load_state_dict(state)
        return cls(config, version=version, metrics=metrics, network=network)


def read_header(blob: bytes) -> dict:
    """The JSON header of a saved model, read without touching its tensors."""
    if len(blob) < 8:
        raise ValueError("not a safetensors blob")
    (length,) = struct.unpack("<Q", blob[:8])
    if length > min(len(blob) - 8, 1 << 20):
        raise ValueError("safetensors header is too long")
    try:
        metadata = json.loads(blob[8 : 8 + length])["__metadata__"]
        header = json.loads(metadata[HEADER_KEY])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"no streamrank header ({error!r})") from None
    if not isinstance(header, dict):
        raise ValueError("malformed streamrank header")
    return header


def constant_logloss(rate: float, clicked: Sequence[bool]) -> float:
    """Logloss of predicting ``rate`` for everything: the floor a model must beat."""
    rate = min(max(rate, 1e-7), 1 - 1e-7)
    n = len(clicked)
    positives = sum(bool(c) for c in clicked)
    return -(positives * math.log(rate) + (n - positives) * math.log(1 - rate)) / max(n, 1)
