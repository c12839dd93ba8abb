"""What each event type does. Handlers are idempotent and order-independent.

A handler receives the parsed ``event`` object and the operator's id, changes our
tables (flush only) and may queue follow-up work with ``enqueue_after_commit``; the job
that called it commits. Processing the same event twice, or two events for one object
in either order, ends in the same state: upserts keep the newest ``updated_at``, and
timeline actions are claimed once per (operator, action key).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from partner_app.sync.orders import upsert_orders
from partner_app.timeline import jobs as timeline_jobs
from partner_app.timeline import services as timeline

Handler = Callable[[dict[str, Any], int, datetime], str]

_HANDLERS: dict[str, Handler] = {}


class HandlerError(Exception):
    """The event cannot be applied as it is (kept as failed, replayable)."""


def handles(event_type: str) -> Callable[[Handler], Handler]:
    """Register the handler of one event type."""

    def register(fn: Handler) -> Handler:
        if event_type in _HANDLERS:
            raise ValueError(f"two handlers for {event_type}")
        _HANDLERS[event_type] = fn
        return fn

    return register


def handler_for(event_type: str) -> Handler | None:
    return _HANDLERS.get(event_type)


def handled_types() -> tuple[str, ...]:
    return tuple(sorted(_HANDLERS))


@handles("order.created")
def order_created(event: dict[str, Any], operator_id: int, now: datetime) -> str:
    """Mirror the order and record, once, that the partner received it."""
    order = (event.get("data") or {}).get("order")
    if not isinstance(order, dict) or not isinstance(order.get("id"), str):
        raise HandlerError("order.created without data.order.id")
    upsert_orders(operator_id, [order], now=now)
    contact = order.get("contact") if isinstance(order.get("contact"), dict) else {}
    timeline_event, created = timeline.create_event(
        operator_id, f"order.created:{order['id']}", template="Action performed",
        variables={"action_name": f"Order {order['id']} received by the partner platform"},
        related={"contact": contact["id"]} if isinstance(contact.get("id"), str) else None,
        now=now)
    if created:
        timeline_jobs.enqueue_after_commit_for(timeline_event.id, operator_id)
    return "order upserted"
