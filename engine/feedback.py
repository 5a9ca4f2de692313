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
A batch (:meth:`Feedback.prepare_many`, :meth:`Feedback.commit_many`) leaves out
the events claimed before and commits the rest as one atomic write that claims
them all, with each counter's increments summed (``engine.store.merged``).

The feature writes include the engagement's co-engagement pairs with the user's
recent items (``engine.item_similarity``, unless ``FeatureConfig.similarity`` is
off; the user's recent items list is read in the same round trip) and its weight
in the shop's popular items, so pairs too are learned once per event.

>>> from engine.messages import Interaction
>>> from engine.store import MemoryStore
>>> feedback = Feedback(MemoryStore())
>>> click = Interaction("e-1", "u-1", "i-9", "click", ts=10.0)
>>> feedback.commit(feedback.prepare(click)), feedback.commit(feedback.prepare(click))
(True, False)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
from engine.item_similarity import engagement_reads, engagement_writes, popularity_write
from engine.messages import Interaction
from engine.store import (
    Batch,
    BlobRead,
    ExistsRead,
    HashRead,
    Read,
    RecordsRead,
    Store,
    Write,
    merged,
)

if TYPE_CHECKING:
    from engine.experiment_metrics import ExperimentCounter, ExperimentState


# What an interaction needs of its item: the catalog's attributes, never its counters.
ITEM_ATTRIBUTES = ("cat", "brand", "price")


@dataclass(slots=True)
class Unapplied:
    """The state a prepared batch leaves in the store once its commit applies, for the users
    and ranked requests it touched: the users' recent items, the requests' labels and the
    experiments' records and totals.

    The worker prepares the next batch while this one commits, so that batch's reads may
    come before this commit: it is prepared on this state instead. That is exact when the
    commit applies as prepared; when it does not (an event was claimed meanwhile by another
    worker), the next batch is prepared again once this commit is done.
    """

    recents: dict[str, list[str]] = field(default_factory=dict)
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    experiments: ExperimentState | None = None


def claim_key(event_id: str) -> str:
    """The key that says an interaction was applied."""
    return f"ev:{event_id}"


@dataclass(slots=True)
class FeedbackPlan:
    """The effects of one interaction, worked out but not yet applied."""

    event_id: str
    writes: list[Write]
    examples: list[LabelledExample] = field(default_factory=list)
    variant: str | None = None  # of the ranked result the interaction came from
    applied_before: bool = False  # claimed already (a redelivery): no writes, no examples


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
        return self.prepare_many([interaction])[0]

    def prepare_many(
        self,
        interactions: Sequence[Interaction],
        experiments: ExperimentCounter | None = None,
        now: float | None = None,
    ) -> list[FeedbackPlan]:
        """Plans for a batch of interactions, in order (:meth:`prepare_batch`'s plans)."""
        return self.prepare_batch(interactions, experiments, now)[0]

    def prepare_batch(
        self,
        interactions: Sequence[Interaction],
        experiments: ExperimentCounter | None = None,
        now: float | None = None,
        unapplied: Unapplied | None = None,
    ) -> tuple[list[FeedbackPlan], Unapplied]:
        """Plans for a batch of interactions, in order, from one round trip of reads, and
        the state the batch leaves once committed (:class:`Unapplied`).

        With ``experiments``, each plan also carries the interaction's experiment counts
        (as of ``now``, default the wall clock): they ride in the event's claimed batch,
        applied once, with it.

        Two clicks on the same ranked result in one batch see each other's labels, as
        they would one after the other; likewise two engagements of one user see each
        other in the user's recent items, so the second pairs with the first (item
        co-engagement, ``engine.item_similarity``).

        An event claimed before, or earlier in the batch, gets an empty plan marked
        ``applied_before``: it changes nothing and teaches nothing again.

        With ``unapplied`` (what the batch before leaves, while it may still be committing)
        the batch is prepared on that state where it read the same users and requests.
        """
        if not interactions:
            return [], Unapplied()
        # Each distinct item and ranked result is read once: a batch often holds several
        # clicks on one result page and many on the same popular items.
        item_ids = list(dict.fromkeys(i.item_id for i in interactions))
        request_ids = list(
            dict.fromkeys(i.request_id for i in interactions if i.request_id is not None)
        )
        similarity = self.features.co_engagement if self.features.similarity else None
        user_ids = (
            list(dict.fromkeys(i.user_id for i in interactions)) if similarity is not None else []
        )
        event_ids = list(dict.fromkeys(i.event_id for i in interactions))
        reads: list[Read] = [
            ExistsRead(tuple(claim_key(event_id) for event_id in event_ids)),
            RecordsRead(tuple(item_key(item_id) for item_id in item_ids), ITEM_ATTRIBUTES),
        ]
        for user_id in user_ids:
            reads += engagement_reads(user_id, similarity)
        for request_id in request_ids:
            reads += [BlobRead(impression_key(request_id)), HashRead(labels_key(request_id))]
        claimed, attributes, *replies = self.store.read(reads)
        unclaimed = {e for e, taken in zip(event_ids, claimed, strict=True) if not taken}
        items = {
            item_id: {
                name: v for name, v in zip(ITEM_ATTRIBUTES, values, strict=True) if v is not None
            }
            for item_id, values in zip(item_ids, attributes, strict=True)
        }
        recents = dict(zip(user_ids, replies[: len(user_ids)], strict=True))
        shown = replies[len(user_ids) :]
        impressions = {
            request_id: Impression.from_bytes(blob) if blob else None
            for request_id, blob in zip(request_ids, shown[::2], strict=True)
        }
        labels = {
            request_id: dict(stored)
            for request_id, stored in zip(request_ids, shown[1::2], strict=True)
        }
        if unapplied is not None:
            recents.update((u, unapplied.recents[u]) for u in user_ids if u in unapplied.recents)
            labels.update(
                (r, dict(unapplied.labels[r])) for r in request_ids if r in unapplied.labels
            )
        plans = []
        for interaction in interactions:
            if interaction.event_id not in unclaimed:
                plans.append(FeedbackPlan(interaction.event_id, [], applied_before=True))
                continue
            unclaimed.discard(interaction.event_id)  # the same event again later: a repeat
            request_id = interaction.request_id
            impression = impressions.get(request_id) if request_id is not None else None
            plan = self._plan(
                interaction, items[interaction.item_id], impression, labels.get(request_id, {})
            )
            plan.writes.append(popularity_write(interaction, self.features.co_engagement))
            if similarity is not None:
                recent = recents[interaction.user_id]
                plan.writes += engagement_writes(interaction, recent, similarity)
                # The next engagement of this user in the batch sees this one, as it would
                # after this plan's PushRecent.
                entry = f"{interaction.item_id}\t{interaction.ts}"
                recents[interaction.user_id] = [entry, *recent][: similarity.recent_items]
            plans.append(plan)
        fresh = [i for i, p in zip(interactions, plans, strict=True) if not p.applied_before]
        leaves = Unapplied(
            recents={i.user_id: recents[i.user_id] for i in fresh if i.user_id in recents},
            labels={i.request_id: labels[i.request_id] for i in fresh if i.request_id in labels},
        )
        if experiments is not None:
            counted, leaves.experiments = experiments.interaction_batch(
                fresh,
                time.time() if now is None else now,
                unapplied.experiments if unapplied is not None else None,
            )
            fresh_plans = (p for p in plans if not p.applied_before)
            for plan, writes in zip(fresh_plans, counted, strict=True):
                plan.writes.extend(writes)
        return plans, leaves

    def _plan(
        self,
        interaction: Interaction,
        item: dict[str, str],
        impression: Impression | None,
        labels: dict[str, str],
    ) -> FeedbackPlan:
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
                    impression, labels, shown_at, interaction.ts
                )
                if new_labels:
                    labels.update(new_labels)  # later clicks in the batch see them
                    plan.writes.append(
                        label_writes(impression.request_id, new_labels, self.impressions)
                    )
        return plan

    def commit(self, plan: FeedbackPlan) -> bool:
        """Apply the plan once per event id; False if this event was applied before."""
        return self.commit_many([plan])[0]

    def commit_many(self, plans: Sequence[FeedbackPlan]) -> list[bool]:
        """Apply plans in one round trip, once per event id; which were applied now.

        The plans not ``applied_before`` commit as one atomic batch claiming all their
        events. If one of those was claimed meanwhile (another worker had it, during a
        rebalance), each plan commits on its own instead, guarded by its own claim.
        """
        fresh = [p for p in plans if not p.applied_before]
        if not fresh:
            return [False] * len(plans)
        together = Batch(
            merged([w for p in fresh for w in p.writes]),
            tuple(claim_key(p.event_id) for p in fresh),
            self.dedup_ttl_s,
        )
        if self.store.apply_many([together])[0]:
            return [not p.applied_before for p in plans]
        one_by_one = iter(
            self.store.apply_many(
                [Batch(p.writes, claim_key(p.event_id), self.dedup_ttl_s) for p in fresh]
            )
        )
        return [False if p.applied_before else next(one_by_one) for p in plans]

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

    def close_due_sources(
        self, now: float, limit: int = 500
    ) -> list[tuple[str, list[LabelledExample]]]:
        """:meth:`close_due` as the learner claims it: one source per closed request, so a
        window closed twice (a redelivery, a retried timer) is learned once."""
        by_request: dict[str, list[LabelledExample]] = {}
        for example in self.close_due(now, limit):
            by_request.setdefault(example.request_id, []).append(example)
        return [(f"close:{request_id}", group) for request_id, group in by_request.items()]
