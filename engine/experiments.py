"""Which ranking variant a shopper sees.

Assignment hashes the user id with a salt: the same user gets the same variant
on every worker and after every restart, and a new salt reshuffles everyone.

>>> assign_variant("u-42", salt="s1", control_share=0.0)
'personalized'
>>> assign_variant("u-42", salt="s1", control_share=1.0)
'control'
"""

from __future__ import annotations

import hashlib

from engine.ranking import CONTROL, PERSONALIZED


def user_bucket(user_id: str, salt: str) -> float:
    """A stable, uniform number in [0, 1) for a user and a salt."""
    digest = hashlib.blake2b(f"{salt}:{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_variant(user_id: str, salt: str, control_share: float) -> str:
    return CONTROL if user_bucket(user_id, salt) < control_share else PERSONALIZED
