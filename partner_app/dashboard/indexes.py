"""Indexes that exist for the dashboard's reads (migration 0007).

Declared here, next to the queries that need them, rather than on the models of the
packages that own the tables. Importing the dashboard (which ``create_app`` always does)
attaches them to the shared metadata, so the drift check compares them like any other.
"""

from sqlalchemy import Index

from partner_app.webhooks.models import WebhookEvent

#: An operator's newest inbox rows, newest first: its recent events, the events page
#: filtered by operator, and "last webhook" (the received_at of its newest row), each a
#: short backward scan however many events the operator or the inbox holds.
WEBHOOK_EVENTS_BY_OPERATOR = Index("ix_webhook_events_operator_id_id",
                                   WebhookEvent.operator_id, WebhookEvent.id)
