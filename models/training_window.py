"""The newest labelled examples, bounded in memory: what the next deep candidate trains on.

The learner adds each example it learned once; the periodic trainer takes the window
(``models.deep_trainer``) when enough is new.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from engine.impressions import LabelledExample


class TrainingWindow:
    """The newest labelled examples, bounded in memory, that the next candidate trains on.

    >>> window = TrainingWindow(size=3)
    >>> window.add([LabelledExample("r", f"i-{n}", 1, n == 4, (0.0,), float(n)) for n in range(5)])
    >>> [e.item_id for e in window.examples], window.ready(min_examples=3, min_clicks=1)
    (['i-2', 'i-3', 'i-4'], True)
    >>> _ = window.take(); window.ready(min_examples=3, min_clicks=1)  # nothing new since
    False
    """

    def __init__(self, size: int = 50_000) -> None:
        self.examples: deque[LabelledExample] = deque(maxlen=size)
        self.added_since_taken = 0

    def add(self, examples: Iterable[LabelledExample]) -> None:
        examples = list(examples)
        self.examples.extend(examples)
        self.added_since_taken += len(examples)

    def ready(self, min_examples: int, min_clicks: int = 10) -> bool:
        """Enough examples (and clicks among them) to train, and something new since last time."""
        return (
            self.added_since_taken > 0
            and len(self.examples) >= min_examples
            and sum(e.clicked for e in self.examples) >= min_clicks
        )

    def take(self) -> list[LabelledExample]:
        """The window's examples, oldest first; counts as trained on."""
        self.added_since_taken = 0
        return list(self.examples)
