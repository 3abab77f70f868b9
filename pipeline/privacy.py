"""Direct identifiers never stored in the clear: emails in bytes that could not be decoded.

A dead letter keeps the message it came from so that it can be inspected and replayed, but
a malformed message may still carry a raw email address. Before it is written anywhere (the
dead-letters topic, ClickHouse), every address-shaped string in it is replaced by the same
SHA-256 form the decoder keeps (``sha256:<hex>``), so joins on the hash still work.
"""

from __future__ import annotations

import re

from pipeline.identity import hash_email

# Deliberately broad: a false positive only hashes a string that looked like an address.
EMAIL_BYTES = re.compile(rb"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+")


def redact_emails(payload: bytes) -> bytes:
    """``payload`` with every email address replaced by ``sha256:<hash of the normalized address>``."""
    if b"@" not in payload:
        return payload
    return EMAIL_BYTES.sub(lambda m: b"sha256:" + hash_email(m.group().decode("ascii", "replace")).encode(), payload)
