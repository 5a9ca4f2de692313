"""What a click, add-to-cart or purchase changes, and the examples it teaches.

Processing an interaction has two steps so that nothing accepted is lost or
counted twice under at-least-once delivery:

1. :meth:`Feedback.prepare` reads what it needs (one round trip) and works out
   the feature writes and the labelled examples, changing nothing;
2. the caller hands the examples on (to the learner's topic), then
   :meth:`Feedback.commit` applies the writes atomically, claiming the
   ``event_id`` in the same step.

A redelivered event finds its claim taken and changes nothing; the examples it
re-sends carry the same ``event_id`` and the learner drops them the same way.

>>> from engine.messages import Interaction
>>> from engine.store import MemoryStore
>>> feedback = Feedback(MemoryStore())
>>> click = Interaction("e-1", "u-1", "i-9", "click", ts=10.0)
>>> feedback.commit(feedback.prepare(click)), feedback.commit(feedback.prepare(click))
(True, False)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.features import FeatureConfig, interaction_writes, item_key
from engine.impressions import (
    DUE_KEY,
    Impression,
    ImpressionConfig,
    LabelledExample,
    click_labels,
    close_labels,
    impression_key,
    label_writes,
    labels_key,
)
from engine.messages import Interaction
from engine.store import BlobRead, HashRead, Store, Write


@dataclass(slots=True)
class FeedbackPlan:
    """The effects of one interaction, worked out but not yet applied."""

    event_id: str
    writes: list[Write]
    examples: list[LabelledExample] = field(default_factory=list)
    variant: str | None = None  # of the ranked result the interaction came from


class Feedback:
    def __init__(
        self,
        store: Store,
        features: FeatureConfig | None = None,
        impressions: ImpressionConfig | None = None,
        dedup_ttl_s: int = 7 * 86400,
    ) -> None:
        self.store = store
        self.features = features or FeatureConfig()
        self.impressions = impressions or ImpressionConfig()
        self.dedup_ttl_s = dedup_ttl_s

    def prepare(self, interaction: Interaction) -> FeedbackPlan:
        """Work out what ``interaction`` changes (raises ``StoreUnavailable`` if Redis is down)."""
        reads = [HashRead(item_key(interaction.item_id))]
        if interaction.request_id is not None:
            reads += [
                BlobRead(impression_key(interaction.request_id)),
                HashRead(labels_key(interaction.request_id)),
            ]
        replies = self.store.read(reads)
        item = replies[0]
        impression = Impression.from_bytes(replies[1]) if len(replies) > 1 and replies[1] else None

        position = interaction.position
        if position is None and impression is not None:
            position = impression.position_of(interaction.item_id)
        query = impression.query if impression is not None else ""
        plan = FeedbackPlan(
            interaction.event_id,
            interaction_writes(interaction, item, query, position, self.features),
            variant=impression.variant if impression is not None else None,
        )
        if interaction.type == "click" and impression is not None:
            # Where the impression says the item was; a position the search layer reports
            # for another item would join the click to the wrong features.
            shown_at = impression.position_of(interaction.item_id)
            if shown_at is not None:
                plan.examples, new_labels = click_labels(
                    impression, replies[2], shown_at, interaction.ts
                )
                if new_labels:
                    plan.writes.append(
                        label_writes(impression.request_id, new_labels, self.impressions)
                    )
        return plan

    def commit(self, plan: FeedbackPlan) -> bool:
        """Apply the plan once per event id; False if this event was applied before."""
        return self.store.apply(plan.writes, once=f"ev:{plan.event_id}", once_ttl=self.dedup_ttl_s)

    def close_due(self, now: float, limit: int = 500) -> list[LabelledExample]:
        """Close the windows of impressions due by ``now``; return their last negatives."""
        request_ids = self.store.pop_due(DUE_KEY, now, limit)
        if not request_ids:
            return []
        reads = []
        for request_id in request_ids:
            reads += [BlobRead(impression_key(request_id)), HashRead(labels_key(request_id))]
        replies = self.store.read(reads)
        examples: list[LabelledExample] = []
        for blob, labels in zip(replies[::2], replies[1::2], strict=True):
            if blob:
                impression = Impression.from_bytes(blob)
                examples += close_labels(impression, labels, self.impressions.close_depth)
        return examples
