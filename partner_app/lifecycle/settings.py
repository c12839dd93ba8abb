"""Retention periods, read from the environment with the platform's other settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from partner_app.envparse import number

MAX_DAYS = 3650


@dataclass(frozen=True)
class RetentionSettings:
    """How long data is kept.

    ``inbox_days``: processed and ignored webhook events (failed and pending ones are
    kept: they still need attention). ``audit_days``: audit log entries.
    ``purge_days``: the grace between purging an operator and deleting its mirror data
    (0: at the next retention run); a reconnect within it cancels the deletion.
    """

    inbox_days: int = 30
    audit_days: int = 365
    purge_days: int = 30

    @property
    def inbox(self) -> timedelta:
        return timedelta(days=self.inbox_days)

    @property
    def audit(self) -> timedelta:
        return timedelta(days=self.audit_days)

    @property
    def purge_grace(self) -> timedelta:
        return timedelta(days=self.purge_days)

    @classmethod
    def parse(cls, environ: Mapping[str, str]) -> tuple[RetentionSettings, list[str]]:
        """The settings and one line per bad variable (defaults stand in for bad values)."""
        problems: list[str] = []
        settings = cls(
            inbox_days=number(environ, "RETENTION_INBOX_DAYS", 30, problems, low=1,
                              high=MAX_DAYS),
            audit_days=number(environ, "RETENTION_AUDIT_DAYS", 365, problems, low=1,
                              high=MAX_DAYS),
            purge_days=number(environ, "RETENTION_PURGE_DAYS", 30, problems, low=0,
                              high=MAX_DAYS),
        )
        return settings, problems
