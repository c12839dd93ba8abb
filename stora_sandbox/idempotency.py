"""``Idempotency-Key`` on every ``POST`` under ``/2025-09``.

Stora: "On first use of a key Stora stores the response status and body — success *or*
failure — for 24 hours; repeats with the same key inside that window get the identical
stored response" (shared/stora-api/api-conventions.md, Idempotency). Here:

* Keys are scoped per application, operator and key value, so two partners (or two
  operators of one partner) never see each other's responses.
* The key is looked at after the bearer token authenticates (a Doorkeeper "use"); a
  request whose token is invalid gets 401 and stores nothing.
* Stored: the status and body the application produced, whatever the status (201, 422,
  500 …), byte for byte, including the original ``meta.request_id`` and, for a webhook
  endpoint create, the ``secret``. The replay has a fresh ``X-Request-Id`` header only.
  The request log marks replays (``idempotent_replay``).
* Not stored: 401, 429 (throttled before the application), requests dropped or answered
  by an injected fault before the application ran (unless the fault has
  ``"stored": true``), and a request still in progress: a second request with the same
  key meanwhile gets 409 ``conflict`` (undocumented at Stora; Stripe and the IETF
  draft do the same).
* After ``idempotency_ttl`` seconds (default 86 400) the key counts as new.
* Reusing a key for another method, path or body replays the stored response (the
  documented reading) unless ``idempotency_key_reuse`` is ``"reject"``, which answers
  400 ``invalid_request``.

Keys are not secrets, but the stored bodies can hold one (a webhook secret); they are
never logged or exposed through the admin API.
"""

from __future__ import annotations

import hashlib

from flask import Response, g, request

from stora_sandbox import tokens
from stora_sandbox.store import Store
from stora_sandbox.wire import bearer_token, stora_error

HEADER = "Idempotency-Key"


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for part in (request.method.encode(), request.full_path.encode(), request.get_data()):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def before(store: Store) -> Response | None:
    """Claim the request's key, or answer for it (replay, 409, 400); None = proceed.

    Only for API ``POST`` requests carrying a non-empty key and a valid token. On a
    claim, ``g.idempotency_identity`` is set and :func:`after` must store the response.
    """
    if request.method != "POST" or g.get("endpoint") != "api":
        return None
    key = request.headers.get(HEADER, "").strip()
    if not key:
        return None
    g.idempotency_key = key
    row = tokens.authenticate_access_token(store, bearer_token())
    if row is None:
        return None
    g.client_id, g.operator_id = row.client_id, row.operator_id
    identity = (row.client_id, row.operator_id, key)
    outcome, entry = store.idempotency_begin(identity, _fingerprint())
    if outcome == "proceed":
        g.idempotency_identity = identity
        return None
    if outcome == "in_progress":
        return stora_error(
            "conflict", "A request with this Idempotency-Key is still being processed."
        )
    if outcome == "mismatch":
        return stora_error(
            "invalid_request", "This Idempotency-Key was already used for a different request."
        )
    assert entry is not None and entry.status is not None
    g.idempotent_replay = True
    return Response(entry.body, status=entry.status, mimetype=entry.mimetype)


def after(store: Store, response: Response) -> None:
    """Store ``response`` for the key this request claimed, if any (401 is not stored)."""
    identity = g.pop("idempotency_identity", None)
    if identity is None:
        return
    if response.status_code == 401 or response.is_streamed:
        store.idempotency_abandon(identity)
        return
    store.idempotency_finish(
        identity, response.status_code, response.get_data(), response.mimetype or ""
    )


def teardown(store: Store) -> None:
    """Release a claim the request never completed (an exception escaped the app)."""
    identity = g.pop("idempotency_identity", None)
    if identity is not None:
        store.idempotency_abandon(identity)
