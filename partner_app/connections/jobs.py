"""Background jobs about connections. Each takes ids, is idempotent, and commits once."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from flask import current_app

from partner_app.connections.credentials import CredentialError, NeedsReauth
from partner_app.connections.models import Operator, OperatorStatus
from partner_app.connections.tokens import OperatorTokens
from partner_app.db import db
from partner_app.queueing import get_redis
from partner_app.stora.client import StoraClient, storefront_host
from partner_app.stora.errors import StoraError

log = logging.getLogger(__name__)


def client_for(operator_id: int) -> StoraClient:
    """A StoraClient for one operator, wired to the app's vault and OAuth client."""
    settings = current_app.extensions["settings"]
    tokens = OperatorTokens(operator_id, vault=current_app.extensions["vault"],
                            oauth=current_app.extensions["stora_oauth"],
                            redis=get_redis())
    return StoraClient(api_base=settings.stora_api_base, tokens=tokens,
                       timeout=(settings.http_connect_timeout, settings.http_read_timeout))


def first_api_call(operator_id: int) -> dict:
    """Prove the chain token → vault → worker → API: list the operator's sites.

    Records ``last_api_success_at`` and the storefront host. Retryable Stora failures
    re-raise (RQ's Retry takes over); permanent ones are recorded on the operator.
    """
    operator = db.session.get(Operator, operator_id)
    if operator is None or operator.status != OperatorStatus.ACTIVE:
        log.info("first_api_call.skipped", extra={"operator_id": operator_id})
        return {"skipped": True}
    client = client_for(operator_id)
    try:
        pages = list(client.iter_pages("sites"))
    except (NeedsReauth, CredentialError) as exc:
        log.warning("first_api_call.no_token", extra={"operator_id": operator_id,
                                                      "error": type(exc).__name__})
        return {"error": type(exc).__name__}
    except StoraError as exc:
        if exc.retryable:
            raise
        db.session.rollback()
        operator = db.session.get(Operator, operator_id)
        operator.last_error = f"first API call failed: {exc}"[:500]
        db.session.commit()
        return {"error": exc.code or type(exc).__name__}
    sites = [site for page in pages for site in page.items]
    operator = db.session.get(Operator, operator_id)
    operator.last_api_success_at = datetime.now(UTC)
    operator.storefront_host = storefront_host(pages[0].meta) or operator.storefront_host
    operator.last_error = None
    db.session.commit()
    log.info("first_api_call.ok", extra={"operator": operator.public_id, "sites": len(sites)})
    return {"sites": len(sites)}


