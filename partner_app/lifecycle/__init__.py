"""The data lifecycle: purging an operator and enforcing retention.

* ``purge.purge_operator`` disconnects an operator (tokens revoked, webhook endpoints
  disabled, data key destroyed) and schedules the deletion of its mirror data after
  ``RETENTION_PURGE_DAYS``, recorded in ``deletion_records``;
* ``retention.run_retention`` carries out due purges and deletes processed inbox events
  older than ``RETENTION_INBOX_DAYS`` and audit entries older than
  ``RETENTION_AUDIT_DAYS``; the cron runs it (``jobs.enforce_retention``), and so does
  ``partner-app retention run``.

Importing this package imports nothing else: settings read ``lifecycle.settings``
without pulling in models.
"""
