"""The online learner in a process of its own, beside the worker's event loop.

Learning is CPU work on every labelled example (tens of microseconds each, two
examples per click). In the worker's process it holds the GIL that rankings and
the interaction path need; in a child process it runs on another core. The worker
that owns the examples topic hands each message over as the bytes it arrived as,
and acks it once the child has claimed and learned it.

One child, one learner: the examples topic has one partition and the pool one
process, so examples are learned in order by one model, as before. The child keeps
the deep model's training window too (the examples it learned), so that examples
cross the process boundary once, as bytes. The functions below run in the child;
:func:`start` is its initializer.

>>> from engine.features import FEATURE_NAMES
>>> from engine.impressions import LabelledExample, examples_message
>>> from engine.store import MemoryStore
>>> from models.online_learner import SnapshotWatcher
>>> store = MemoryStore()
>>> start_with(store, {"publish_every_s": 0.0}, warmup_examples=1, window=100)
>>> example = LabelledExample("r-1", "i-1", 1, True, (0.5,) * len(FEATURE_NAMES), 0.0)
>>> message = examples_message([("e-1", [example])])
>>> learn_message(message, 0), learn_message(message, 0)  # the second is a replay
(1, 0)
>>> SnapshotWatcher(store).poll().version  # published: the interval is 0 here
1
>>> publish_if_due(), len(training_examples(min_examples=1, min_clicks=1))  # nothing new
(False, 1)
"""

from __future__ import annotations

from typing import Any

from engine.impressions import LabelledExample, read_examples_message
from engine.redis_store import RedisStore
from engine.store import Store
from models.online_learner import OnlineLearner
from models.training_window import TrainingWindow
from streams.settings import BACKGROUND_REDIS_TIMEOUT_S

_store: Store | None = None
_learner: OnlineLearner | None = None
_learner_options: dict[str, Any] = {}
_warmup_examples = 0
_window = TrainingWindow()


def start(redis_url: str, key_prefix: str, learner_options: dict, warmup_examples: int,
          window: int) -> None:  # fmt: skip
    """The child's initializer: its own connection to Redis, no learner yet."""
    store = RedisStore(redis_url, key_prefix=key_prefix, timeout_s=BACKGROUND_REDIS_TIMEOUT_S)
    start_with(store, learner_options, warmup_examples, window)


def start_with(store: Store, learner_options: dict, warmup_examples: int, window: int) -> None:
    global _store, _learner, _learner_options, _warmup_examples, _window
    _store, _learner = store, None
    _learner_options, _warmup_examples = learner_options, warmup_examples
    _window = TrainingWindow(window)


def learn_message(raw: bytes, newest_version: int) -> int:
    """Claim and learn the examples of one message; how many were new.

    ``newest_version`` is the newest model version the worker has seen: when another
    worker has learned meanwhile (a rebalance), learning continues from its model.
    """
    global _learner
    assert _store is not None, "start() first"
    if _learner is None or newest_version > _learner.version:
        _learner = OnlineLearner(_store, **_learner_options, warmup_examples=_warmup_examples)
    fresh = _learner.learn_many(read_examples_message(raw))
    _window.add(fresh)
    _learner.publish_if_due()
    return len(fresh)


def publish_if_due() -> bool:
    """Publish what was learned since the last version, once the interval has passed."""
    return _learner is not None and _learner.publish_if_due()


def training_examples(min_examples: int, min_clicks: int = 10) -> list[LabelledExample] | None:
    """The training window, taken, if it is ready for the next deep candidate."""
    if not _window.ready(min_examples, min_clicks):
        return None
    return _window.take()
