"""Verifying ``X-Stora-Signature`` on webhook deliveries.

Stora signs ``"{t}.{raw body}"`` with HMAC-SHA256 under the endpoint's secret (its
UTF-8 bytes) and sends ``X-Stora-Signature: t=<unix seconds>,v1=<lowercase hex>``.

The parser is strict on purpose, since this runs on untrusted input before anything
else: exactly one ``t`` of 1-12 digits, one or more ``v1`` of 64 lowercase hex digits
(several allow secret rotation), unknown schemes ignored, at most 16 items and 1,024
characters. Every failure is a ``SignatureError`` with a short reason, never another
exception type and never a 500. The time check is symmetric (Stripe's is one-sided),
and any of several active secrets may match.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass

HEADER = "X-Stora-Signature"
DEFAULT_TOLERANCE = 300
MAX_HEADER_LENGTH = 1024
MAX_ITEMS = 16
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
_V1_RE = re.compile(r"[0-9a-f]{64}")


class SignatureError(Exception):
    """The delivery is not authentic (or not checkable). ``reason`` is safe to log."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SignatureHeader:
    timestamp: int
    signatures: tuple[bytes, ...]


def parse_header(header: str | None) -> SignatureHeader:
    """Parse ``t=…,v1=…[,v1=…]``. Raises SignatureError."""
    if not header:
        raise SignatureError("missing")
    if len(header) > MAX_HEADER_LENGTH:
        raise SignatureError("header_too_long")
    items = header.split(",")
    if len(items) > MAX_ITEMS:
        raise SignatureError("too_many_items")
    timestamps: list[str] = []
    signatures: list[bytes] = []
    for item in items:
        scheme, sep, value = item.partition("=")
        if not sep:
            raise SignatureError("malformed_item")
        if scheme == "t":
            timestamps.append(value)
        elif scheme == "v1":
            if not _V1_RE.fullmatch(value):
                raise SignatureError("malformed_v1")
            signatures.append(bytes.fromhex(value))
    if len(timestamps) != 1 or not _TIMESTAMP_RE.fullmatch(timestamps[0]):
        raise SignatureError("malformed_timestamp")
    if not signatures:
        raise SignatureError("no_v1")
    return SignatureHeader(int(timestamps[0]), tuple(signatures))


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The header Stora would send (used by tests and tools, never by the receiver)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify(body: bytes, header: str | None, secrets: Sequence[str], *, now: float,
           tolerance: int = DEFAULT_TOLERANCE) -> int:
    """Check a delivery; return its signed timestamp. Raises SignatureError.

    ``body`` must be the raw request bytes, exactly as received.
    """
    parsed = parse_header(header)
    if tolerance and abs(now - parsed.timestamp) > tolerance:
        raise SignatureError("timestamp_out_of_tolerance")
    signed = f"{parsed.timestamp}.".encode() + body
    matched = False
    for secret in secrets:
        if not secret.strip():  # a blank secret would authenticate anyone who guesses it
            continue
        expected = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
        for candidate in parsed.signatures:
            # Evaluate every pair: no early exit that would time which one matched.
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError("no_match")
    return parsed.timestamp
