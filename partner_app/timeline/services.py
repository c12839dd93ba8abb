"""Record an action on an operator's Stora timeline exactly once.

``create_event`` claims a ``timeline_events`` row by its unique (operator, action key):
a second call for the same action finds the row and adds nothing. ``deliver`` sends
``POST /2025-09/timeline/events`` with an ``Idempotency-Key`` derived from the operator,
the action key and the row's key generation, so a retry after a lost response is
replayed by Stora rather than duplicated. The generation moves on only after Stora
*answered* with an error (Stora stores and replays answers, errors included, for 24 h).

The partner's source and the template are found by name in the operator's
``/timeline/sources`` and ``/timeline/templates`` (Stora documents no other way) and
cached per operator in Redis for an hour: ids only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis as redis_lib
from sqlalchemy import select, update

from partner_app.db import db, insert_for, utcnow
from partner_app.stora.client import StoraClient
from partner_app.stora.errors import ApiError, StoraError
from partner_app.timeline.models import EventStatus, TimelineEvent

log = logging.getLogger(__name__)

# The partner's source as Stora set it up at onboarding (configurable per deployment).
DEFAULT_SOURCE_NAME = "Partner platform"
RELATED_KINDS = ("contact", "site", "invoice", "subscription", "tenancy", "unit", "unit_type")
TARGETS_TTL = 3600
_KEY_NAMESPACE = uuid.UUID("6f1c2b0e-5d8a-4c3e-9a71-2b4f8e0d1c55")


class TimelineNotSetUp(ApiError):
    """The operator's Stora account shows no source or template of that name."""


@dataclass(frozen=True)
class Targets:
    """The ids of the partner's source and of the templates, for one operator."""

    source_id: str
    templates: dict[str, str]  # template name -> aetpl_ id


def idempotency_key(operator_id: int, action_key: str, generation: int) -> str:
    """A UUID that is the same for every retry of one action (one generation)."""
    return str(uuid.uuid5(_KEY_NAMESPACE, f"{operator_id}\x1f{action_key}\x1f{generation}"))


def create_event(operator_id: int, action_key: str, *, template: str,
                 variables: Mapping[str, Any], related: Mapping[str, str] | None = None,
                 description: str | None = None, external: Mapping[str, str] | None = None,
                 now: datetime | None = None) -> tuple[TimelineEvent, bool]:
    """Claim the row for (operator, action key); returns it and whether it is new.

    The row is inserted with ``ON CONFLICT DO NOTHING``, so concurrent callers for one
    action end with one row, whoever wins. Flushes only.
    """
    unknown = set(related or {}) - set(RELATED_KINDS)
    if unknown:
        raise ValueError(f"unknown related kinds: {sorted(unknown)}")
    request = {"template": template, "variables": dict(variables),
               "related": dict(related or {}), "description": description,
               "external": dict(external) if external else None}
    stmt = insert_for(TimelineEvent).values(
        operator_id=operator_id, action_key=action_key[:200], request=request,
        status=EventStatus.PENDING, attempts=0, key_generation=0,
        created_at=now or utcnow(),
    ).on_conflict_do_nothing(index_elements=["operator_id", "action_key"]).returning(
        TimelineEvent.id)
    created = db.session.execute(stmt).scalar_one_or_none() is not None
    event = db.session.scalars(
        select(TimelineEvent).where(TimelineEvent.operator_id == operator_id,
                                    TimelineEvent.action_key == action_key[:200])).one()
    return event, created


def resolve_targets(client: StoraClient, operator_id: int, *, source_name: str,
                    cache: redis_lib.Redis | None = None) -> Targets:
    """The partner's source and every visible template, by name (cached per operator)."""
    cache_key = _targets_key(operator_id, source_name)
    if cache is not None:
        cached = cache.get(cache_key)
        if cached:
            data = json.loads(cached)
            return Targets(source_id=data["source_id"], templates=data["templates"])
    source_id = None
    for page in client.iter_pages("timeline/sources"):
        for source in page.items:
            if source.get("name") == source_name and source.get("id"):
                source_id = str(source["id"])
    if source_id is None:
        raise TimelineNotSetUp(f"no timeline source named {source_name!r}",
                               code="timeline_source_missing")
    templates = {str(t["name"]): str(t["id"]) for page in client.iter_pages("timeline/templates")
                 for t in page.items if t.get("name") and t.get("id")}
    targets = Targets(source_id=source_id, templates=templates)
    if cache is not None:
        cache.set(cache_key, json.dumps({"source_id": source_id, "templates": templates}),
                  ex=TARGETS_TTL)
    return targets


def _targets_key(operator_id: int, source_name: str) -> str:
    digest = hashlib.sha256(source_name.encode()).hexdigest()[:12]
    return f"timeline:targets:{operator_id}:{digest}"


def forget_targets(operator_id: int, *, source_name: str,
                   cache: redis_lib.Redis | None) -> None:
    if cache is not None:
        cache.delete(_targets_key(operator_id, source_name))


def event_body(event: TimelineEvent, targets: Targets) -> dict[str, Any]:
    request = event.request
    template_id = targets.templates.get(request["template"])
    if template_id is None:
        raise TimelineNotSetUp(f"no timeline template named {request['template']!r}",
                               code="timeline_template_missing")
    body: dict[str, Any] = {"source": {"id": targets.source_id},
                            "template": {"id": template_id},
                            "variables": request.get("variables") or {}}
    for kind, ref_id in (request.get("related") or {}).items():
        body[kind] = {"id": ref_id}
    if request.get("description"):
        body["description"] = request["description"]
    if request.get("external"):
        body["external"] = request["external"]
    return body


def deliver(event_id: int, client: StoraClient, *, source_name: str,
            commit: Callable[[], None], cache: redis_lib.Redis | None = None,
            now: Callable[[], datetime] = utcnow) -> TimelineEvent:
    """Send one pending event to Stora and record the outcome.

    ``commit`` is called before the HTTP call (the token source may commit or roll back
    the session during it) and after the outcome is written. A permanent refusal marks
    the event failed and returns it; a transient failure is recorded and re-raised for
    the caller's retry policy. An event that is not pending is returned untouched.
    """
    event = db.session.get(TimelineEvent, event_id)
    if event is None or event.status != EventStatus.PENDING:
        return event
    db.session.execute(update(TimelineEvent).where(TimelineEvent.id == event_id)
                       .values(attempts=TimelineEvent.attempts + 1)
                       .execution_options(synchronize_session=False))
    operator_id, action_key = event.operator_id, event.action_key
    generation = event.key_generation
    commit()
    posted = False
    try:
        targets = resolve_targets(client, operator_id, source_name=source_name, cache=cache)
        body = event_body(db.session.get(TimelineEvent, event_id), targets)
        posted = True
        response = client.request("POST", "timeline/events", json=body,
                                  idempotency_key=idempotency_key(operator_id, action_key,
                                                                  generation))
    except StoraError as exc:
        db.session.rollback()
        _record_failure(event_id, exc, generation=generation if posted else None)
        if isinstance(exc, TimelineNotSetUp) or exc.status in (403, 404, 422):
            # The cached ids may be stale (a template renamed or removed).
            forget_targets(operator_id, source_name=source_name, cache=cache)
        commit()
        if _transient(exc):
            raise
        return db.session.get(TimelineEvent, event_id)
    stora_id = (response.get("event") or {}).get("id")
    db.session.execute(update(TimelineEvent).where(TimelineEvent.id == event_id)
                       .values(status=EventStatus.RECORDED, recorded_at=now(),
                               stora_event_id=str(stora_id)[:64] if stora_id else None,
                               last_error=None)
                       .execution_options(synchronize_session=False))
    commit()
    log.info("timeline.recorded", extra={"operator_id": operator_id, "action_key": action_key,
                                         "stora_event_id": stora_id})
    return db.session.get(TimelineEvent, event_id)


def _transient(exc: StoraError) -> bool:
    # 409: Stora is still working on a request with this key (a concurrent retry).
    return exc.retryable or exc.status == 409


def _record_failure(event_id: int, exc: StoraError, *, generation: int | None) -> None:
    """Note a failed attempt; ``generation`` is the key generation if the POST was sent."""
    values: dict[str, Any] = {"last_error": _describe(exc)}
    if generation is not None and exc.status is not None and exc.status not in (409, 429):
        # Stora stored this answer under the key: only a new key gets a real retry.
        values["key_generation"] = generation + 1
    if not _transient(exc):
        values["status"] = EventStatus.FAILED
    db.session.execute(update(TimelineEvent).where(TimelineEvent.id == event_id)
                       .values(values).execution_options(synchronize_session=False))
    log.warning("timeline.failed", extra={"event_id": event_id, "error": values["last_error"],
                                          "final": "status" in values})


def _describe(exc: StoraError) -> str:
    parts = [type(exc).__name__]
    if exc.status:
        parts.append(str(exc.status))
    if exc.code:
        parts.append(str(exc.code))
    if exc.request_id:
        parts.append(f"request {exc.request_id}")
    return " ".join(parts)[:500]


def record_action(operator_id: int, action_key: str, *, template: str,
                  variables: Mapping[str, Any], client: StoraClient,
                  commit: Callable[[], None], related: Mapping[str, str] | None = None,
                  description: str | None = None, external: Mapping[str, str] | None = None,
                  source_name: str = DEFAULT_SOURCE_NAME,
                  cache: redis_lib.Redis | None = None) -> TimelineEvent:
    """Record one action on the operator's timeline, at most once whatever the retries.

    Claims the row, commits it, and delivers it unless it was already recorded or
    failed. Transient Stora failures propagate (the row stays pending for a retry).
    """
    event, _ = create_event(operator_id, action_key, template=template, variables=variables,
                            related=related, description=description, external=external)
    return deliver(event.id, client, source_name=source_name, commit=commit, cache=cache)
