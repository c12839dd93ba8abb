"""Webhook events: envelopes, signatures and delivery with retries.

Envelope (shared/stora-api/webhooks.md §3.2, examples/order-created-webhook.raw.json)::

    {"event": {"id": "evt_…", "type": "order.created", "api_version": "2025-09",
               "created_at": "…Z", "data": {"order": {…}}, "meta": {"curies": […]}}}

serialised compactly (``separators=(",", ":")``, UTF-8, non-ASCII kept as is, e.g.
``£``), exactly like the raw example. ``data`` holds the resource under the key before
the dot of the event type (``order``, ``contact``, ``unit_type`` …); ``order.created``
embeds the order's contact and site as full objects, as Stora's event examples do.
Every endpoint receives the same bytes for one event.

Request (§3.1, §4): ``POST`` to the endpoint URL with ``Content-Type: application/json``,
``User-Agent: Stora-Webhooks/1.0``, ``X-Stora-Request-Id`` (a new UUID per attempt) and
``X-Stora-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{raw body}")>``
(the secret's UTF-8 bytes are the key; see :func:`sign`). ``t`` is the sandbox clock
when the attempt is made (real time when run as a process). Redirects are not followed.

Delivery (:class:`Dispatcher`): one background thread, started on first use, sends one
attempt at a time, never blocking the request that emitted the event. An attempt
succeeds on a 2xx answer; anything else (other status, timeout after
``webhook_timeout_s``, connection error) fails it and schedules a retry after 1 min,
5 min, 30 min, 2 h, 5 h, 10 h (the first three are Stora's, the rest **inferred**),
each times ``webhook_time_factor``, up to ``webhook_max_retries`` retries. Retries are
signed with a fresh ``t`` unless ``webhook_resign_retries`` is off. Each attempt reads
the endpoint's current URL, secret and status: a disabled or deleted endpoint's pending
attempts are dropped (logged as skipped). ``webhook_duplicate_rate`` adds independent
duplicate deliveries, ``webhook_shuffle`` delivers events emitted together out of
order, and ``webhook_auto_disable_after`` disables an endpoint after that many
consecutive failed attempts.

The attempt log (:meth:`Dispatcher.attempts`) holds ids, type, URL, attempt number,
``t``, status or error and timings; never the secret or the signature.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import http.client
import itertools
import json
import logging
import random
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from stora_sandbox import seed
from stora_sandbox.api import curies
from stora_sandbox.config import API_VERSION
from stora_sandbox.models import Operator
from stora_sandbox.store import Store

log = logging.getLogger("stora_sandbox.webhooks")

USER_AGENT = "Stora-Webhooks/1.0"
RETRY_DELAYS_S = (60, 300, 1800, 7200, 18_000, 36_000)
MAX_LOGGED_ATTEMPTS = 10_000
RESPONSE_READ_LIMIT = 64 * 1024

# Id prefixes for generated payloads of event types without stored records.
PAYLOAD_PREFIXES = {
    "coupon": "cpn_",
    "credit_note": "cn_",
    "deal": "deal_",
    "identity_verification": "idv_",
    "invoice": "inv_",
    "protection_level": "plvl_",
    "unit": "unit_",
    "unit_type": "utype_",
    "contact": "con_",
    "order": "order_",
}


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Lowercase hex HMAC-SHA256 of ``b"<timestamp>." + body`` keyed by the secret."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Stora-Signature`` value: ``t=<timestamp>,v1=<signature>``."""
    return f"t={timestamp},v1={sign(secret, timestamp, body)}"


def encode(envelope: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, byte-compatible with the docs' raw example."""
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode()


def payload_key(event_type: str) -> str:
    """``order`` for ``order.created``: the key of the resource inside ``data``."""
    return event_type.split(".", 1)[0]


def expanded_order(store: Store, order_data: dict[str, Any], operator_id: str) -> dict[str, Any]:
    """The order with ``contact`` and ``site`` embedded as full objects when stored."""
    order = dict(order_data)
    for name in ("contact", "site"):
        ref = order.get(name)
        if isinstance(ref, dict) and "id" in ref:
            record = store.get_resource(name, operator_id, ref["id"])
            if record is not None:
                order[name] = dict(record.data)
    return order


def default_data(store: Store, operator: Operator, event_type: str) -> dict[str, Any]:
    """``data`` for an event emitted without one: the latest stored order or contact
    for ``order.*``/``contact.*``, else a minimal ``{id, created_at, updated_at}``.

    Raises:
        ValueError: ``order.*`` for an operator without orders.
    """
    key = payload_key(event_type)
    if key in ("order", "contact"):
        records = sorted(store.list_resources(key, operator.id), key=lambda r: r.seq)
        if records:
            data = records[-1].data
            if key == "order":
                data = expanded_order(store, data, operator.id)
            return {key: dict(data)}
        if key == "order":
            raise ValueError("the operator has no orders; pass data")
    now = seed.iso(datetime.fromtimestamp(store.now(), UTC))
    prefix = PAYLOAD_PREFIXES.get(key, f"{key}_")
    return {key: {"id": f"{prefix}{secrets.token_hex(8)}", "created_at": now, "updated_at": now}}


@dataclass
class Delivery:
    """One event on its way to one endpoint; ``attempt`` is the next attempt's number
    (1 = first delivery) and ``first_t`` the first attempt's signature time."""

    id: str
    event_id: str
    event_type: str
    endpoint_id: str
    operator_id: str
    body: bytes
    duplicate: bool = False
    attempt: int = 1
    first_t: int | None = None


Sender = Callable[[str, bytes, dict[str, str], float], tuple[int | None, str | None]]


def http_post(
    url: str, body: bytes, headers: dict[str, str], timeout: float
) -> tuple[int | None, str | None]:
    """POST ``body`` to ``url`` without following redirects.

    Returns ``(status, None)`` for any HTTP answer or ``(None, error)`` for a timeout or
    connection failure (``error`` is the exception class and message).
    """
    parts = urlsplit(url)
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = connection_class(parts.hostname or "", parts.port, timeout=timeout)
    try:
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        response.read(RESPONSE_READ_LIMIT)
        return response.status, None
    except (OSError, http.client.HTTPException) as exc:
        return None, f"{type(exc).__name__}: {exc}"[:300]
    finally:
        connection.close()


class Dispatcher:
    """Queue and background thread that deliver webhook attempts; thread-safe.

    Never call it while holding ``store.lock``. ``sender`` exists for tests.
    """

    def __init__(self, store: Store, sender: Sender = http_post) -> None:
        self._store = store
        self._sender = sender
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Delivery]] = []
        self._order = itertools.count()
        self._attempt_seq = itertools.count(1)
        self._attempts: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None
        self._in_flight: tuple[str, int] | None = None
        self._generation = 0
        self._stopping = False
        self._random = random.Random()

    # -- producing --------------------------------------------------------------------

    def emit(
        self, operator: Operator, events: list[tuple[str, dict[str, Any]]]
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Build one event per ``(type, data)`` and queue it, as one batch, for every
        enabled endpoint of ``operator`` subscribed to the type.

        Returns the event objects (the value of the envelope's ``event`` key) and the ids
        of the deliveries queued, duplicates included.
        """
        store = self._store
        endpoints = [
            e
            for e in store.list_webhook_endpoints(operator.id)
            if e.data["status"] == "enabled" and e.data["api_version"] == API_VERSION
        ]
        created_at = seed.iso(datetime.fromtimestamp(store.now(), UTC))
        built: list[dict[str, Any]] = []
        deliveries: list[Delivery] = []
        for event_type, data in events:
            event = {
                "id": f"evt_{secrets.token_hex(8)}",
                "type": event_type,
                "api_version": API_VERSION,
                "created_at": created_at,
                "data": data,
                "meta": {"curies": curies(operator)},
            }
            body = encode({"event": event})
            built.append(event)
            for endpoint in endpoints:
                if event_type in endpoint.data["event_types"]:
                    deliveries.append(
                        Delivery(
                            id=f"dlv_{secrets.token_hex(8)}",
                            event_id=event["id"],
                            event_type=event_type,
                            endpoint_id=endpoint.id,
                            operator_id=operator.id,
                            body=body,
                        )
                    )
        queued = self.submit(deliveries) if deliveries else []
        return built, queued

    def submit(self, deliveries: list[Delivery]) -> list[str]:
        """Queue ``deliveries`` as one batch, due now, adding duplicates and shuffling
        as the switches say; return the ids queued in delivery order (none once
        stopped)."""
        switches = self._store.switches
        with self._cond:
            if self._stopping:
                return []
            batch: list[Delivery] = []
            for delivery in deliveries:
                batch.append(delivery)
                if self._random.random() < switches.webhook_duplicate_rate:
                    batch.append(
                        replace(delivery, id=f"dlv_{secrets.token_hex(8)}", duplicate=True)
                    )
            if switches.webhook_shuffle and len(batch) > 1:
                original = list(batch)
                while batch == original:
                    self._random.shuffle(batch)
            now = time.monotonic()
            for delivery in batch:
                heapq.heappush(self._heap, (now, next(self._order), delivery))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="stora_sandbox-webhooks", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
            return [d.id for d in batch]

    # -- delivering -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    wait: float | None = None
                    if self._heap:
                        wait = self._heap[0][0] - time.monotonic()
                        if wait <= 0:
                            break
                    self._cond.wait(wait)
                _due, _order, delivery = heapq.heappop(self._heap)
                generation = self._generation
                self._in_flight = (delivery.id, delivery.attempt)
            try:
                self._attempt(delivery, generation)
            except Exception:
                log.exception("webhook attempt %s crashed", delivery.id)
            finally:
                with self._cond:
                    self._in_flight = None
                    self._cond.notify_all()

    def _attempt(self, delivery: Delivery, generation: int) -> None:
        store = self._store
        switches = store.switches
        endpoint = store.get_webhook_endpoint(delivery.endpoint_id)
        entry: dict[str, Any] = {
            "delivery_id": delivery.id,
            "event_id": delivery.event_id,
            "event_type": delivery.event_type,
            "endpoint_id": delivery.endpoint_id,
            "operator_id": delivery.operator_id,
            "attempt": delivery.attempt,
            "duplicate": delivery.duplicate,
            "at": store.now(),
            "url": None,
            "request_id": None,
            "signature_t": None,
            "status_code": None,
            "error": None,
            "ok": False,
            "skipped": False,
            "duration_ms": None,
            "next_attempt_in_s": None,
            "gave_up": False,
            "endpoint_disabled": False,
        }
        if endpoint is None or endpoint.data["status"] != "enabled":
            entry["skipped"] = True
            entry["error"] = "endpoint_missing" if endpoint is None else "endpoint_disabled"
            self._log(entry, generation)
            return
        if delivery.first_t is None or switches.webhook_resign_retries:
            t = int(entry["at"])
        else:
            t = delivery.first_t
        if delivery.first_t is None:
            delivery.first_t = t
        request_id = str(uuid.uuid4())
        url = endpoint.data["url"]
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Stora-Request-Id": request_id,
            "X-Stora-Signature": signature_header(endpoint.secret, t, delivery.body),
        }
        started = time.perf_counter()
        status, error = self._sender(url, delivery.body, headers, switches.webhook_timeout_s)
        ok = status is not None and 200 <= status < 300
        entry.update(
            url=url,
            request_id=request_id,
            signature_t=t,
            status_code=status,
            error=error,
            ok=ok,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        with self._cond:
            if generation != self._generation or self._stopping:
                return
        entry["endpoint_disabled"] = self._count_outcome(endpoint.id, ok)
        if not ok:
            retries_done = delivery.attempt - 1
            if retries_done < switches.webhook_max_retries and not entry["endpoint_disabled"]:
                delay = RETRY_DELAYS_S[min(retries_done, len(RETRY_DELAYS_S) - 1)]
                delay_s = delay * switches.webhook_time_factor
                entry["next_attempt_in_s"] = delay_s
                with self._cond:
                    if generation == self._generation and not self._stopping:
                        delivery.attempt += 1
                        due = time.monotonic() + delay_s
                        heapq.heappush(self._heap, (due, next(self._order), delivery))
                        self._cond.notify_all()
            else:
                entry["gave_up"] = True
        self._log(entry, generation)

    def _count_outcome(self, endpoint_id: str, ok: bool) -> bool:
        """Track consecutive failures; return True if this one disabled the endpoint."""
        store = self._store
        limit = store.switches.webhook_auto_disable_after
        with store.lock:
            endpoint = store.get_webhook_endpoint(endpoint_id)
            if endpoint is None:
                return False
            if ok:
                endpoint.consecutive_failures = 0
                return False
            endpoint.consecutive_failures += 1
            if not limit or endpoint.consecutive_failures < limit:
                return False
            if endpoint.data["status"] != "enabled":
                return False
            now = seed.iso(datetime.fromtimestamp(store.now(), UTC))
            endpoint.data = {
                **endpoint.data,
                "disabled_at": now,
                "status": "disabled",
                "updated_at": now,
            }
            endpoint.updated_at = seed.parse_time(now)
            return True

    def _log(self, entry: dict[str, Any], generation: int) -> None:
        with self._cond:
            if generation != self._generation:
                return
            entry = {"seq": next(self._attempt_seq), **entry}
            self._attempts.append(entry)
            if len(self._attempts) > MAX_LOGGED_ATTEMPTS:
                del self._attempts[: len(self._attempts) - MAX_LOGGED_ATTEMPTS]
            self._cond.notify_all()
        outcome = entry["status_code"] if entry["status_code"] is not None else entry["error"]
        log.info(
            "webhook %s %s -> %s attempt %d: %s%s",
            entry["event_id"],
            entry["event_type"],
            entry["endpoint_id"],
            entry["attempt"],
            outcome,
            " (duplicate)" if entry["duplicate"] else "",
        )

    # -- observing and controlling ----------------------------------------------------

    def attempts(
        self, endpoint_id: str | None = None, event_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Logged attempts, oldest first, optionally for one endpoint and/or event."""
        with self._cond:
            return [
                dict(a)
                for a in self._attempts
                if (endpoint_id is None or a["endpoint_id"] == endpoint_id)
                and (event_id is None or a["event_id"] == event_id)
            ]

    def pending(self) -> list[dict[str, Any]]:
        """Queued attempts (not the one in flight), soonest first."""
        with self._cond:
            now = time.monotonic()
            return [
                {
                    "delivery_id": d.id,
                    "event_id": d.event_id,
                    "event_type": d.event_type,
                    "endpoint_id": d.endpoint_id,
                    "attempt": d.attempt,
                    "duplicate": d.duplicate,
                    "due_in_s": max(0.0, round(due - now, 3)),
                }
                for due, _order, d in sorted(self._heap, key=lambda item: item[:2])
            ]

    def flush(self, timeout: float = 30.0) -> dict[str, int]:
        """Make every queued attempt due now and wait until each has been made once
        (retries they schedule are not waited for), or until ``timeout`` seconds.

        Returns ``{"flushed": attempts waited for, "pending": queued afterwards}``.
        """
        with self._cond:
            now = time.monotonic()
            wanted = {(d.id, d.attempt) for _due, _order, d in self._heap}
            if self._in_flight is not None:
                wanted.add(self._in_flight)
            self._heap = [(min(due, now), order, d) for due, order, d in self._heap]
            heapq.heapify(self._heap)
            self._cond.notify_all()
            deadline = now + timeout
            while True:
                queued = {(d.id, d.attempt) for _due, _order, d in self._heap}
                if self._in_flight is not None:
                    queued.add(self._in_flight)
                remaining = deadline - time.monotonic()
                if not wanted & queued or remaining <= 0:
                    break
                self._cond.wait(remaining)
            return {"flushed": len(wanted), "pending": len(self._heap)}

    def clear(self) -> None:
        """Drop queued attempts and the attempt log; an attempt in flight finishes but
        is neither logged nor retried."""
        with self._cond:
            self._heap.clear()
            self._attempts.clear()
            self._generation += 1
            self._cond.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        """Drop queued attempts and end the thread, waiting for an attempt in flight
        (at most ``timeout`` seconds; default: the attempt timeout plus one)."""
        with self._cond:
            self._stopping = True
            self._heap.clear()
            self._generation += 1
            self._cond.notify_all()
            thread = self._thread
        if timeout is None:
            timeout = self._store.switches.webhook_timeout_s + 1
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
