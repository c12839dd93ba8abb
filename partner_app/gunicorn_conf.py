"""Gunicorn server hooks for ``partner-app web`` (``--config python:partner_app.gunicorn_conf``).

Only hooks live here; every other option is on the command line in ``partner_app/cli.py``.
"""

from __future__ import annotations


def child_exit(server, worker) -> None:
    """A worker died or was replaced: drop its live gauges from the shared metrics."""
    from partner_app import metrics

    metrics.mark_process_dead(worker.pid)


def when_ready(server) -> None:
    import os

    from partner_app.metrics import MULTIPROC_ENV

    if server.cfg.workers > 1 and not os.environ.get(MULTIPROC_ENV):
        server.log.warning("metrics.single_process_mode: %s is not set, so /metrics shows "
                           "only the worker that answers", MULTIPROC_ENV)
