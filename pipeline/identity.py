"""Identifiers: normalization, hashing, and the key a customer's events are partitioned by."""

from __future__ import annotations

import hashlib

EMAIL_PREFIX = "email:"
LOYALTY_PREFIX = "loyalty:"
ANONYMOUS_PREFIX = "anon:"


def hash_email(email: str) -> str:
    """SHA-256 of the trimmed, lower-cased address: the only form an email is kept in."""
    return hashlib.sha256(email.strip().lower().encode("utf-8")).hexdigest()


def clean_id(value: object) -> str | None:
    """Trimmed identifier, or None when empty."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def routing_key(*, customer_id: str | None, loyalty_id: str | None,
                email_hash: str | None, anonymous_id: str | None) -> str | None:
    """The key a customer's events are partitioned and stored under.

    The CRM customer id once known; otherwise the strongest other identifier, prefixed
    so identifiers of different kinds never collide.
    """
    if customer_id:
        return customer_id
    if loyalty_id:
        return LOYALTY_PREFIX + loyalty_id
    if email_hash:
        return EMAIL_PREFIX + email_hash
    if anonymous_id:
        return ANONYMOUS_PREFIX + anonymous_id
    return None
