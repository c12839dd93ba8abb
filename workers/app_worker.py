"""An RQ worker that runs every job inside a fresh Flask application context."""

from __future__ import annotations

import gc
import importlib
import os

from flask import Flask
from rq import Worker
from rq.serializers import JSONSerializer

from partner_app import metrics
from partner_app.logging import job_context


class AppWorker(Worker):
    """Forks a work-horse per job (so a crash or kill -9 costs one job, not the worker)
    and gives each job its own app context, hence its own database session."""

    app: Flask

    def __init__(self, *args, app: Flask, **kwargs):
        kwargs.setdefault("serializer", JSONSerializer)
        super().__init__(*args, **kwargs)
        self.app = app

    def perform_job(self, job, queue, execution) -> bool:
        metrics.adopt_work_horse_identity()
        with self.app.app_context(), job_context(job.id):
            try:
                return super().perform_job(job, queue, execution)
            finally:
                from partner_app.db import db

                db.session.remove()

    # Job outcomes for /metrics; the horse reports its own, the worker reports a killed horse.
    def handle_job_success(self, job, queue, *args, **kwargs):
        metrics.job_done(job.origin, "finished")
        return super().handle_job_success(job, queue, *args, **kwargs)

    def handle_job_retry(self, job, queue, retry, *args, **kwargs):
        metrics.job_done(job.origin, "failed" if (job.number_of_retries or 0) >= retry.max
                         else "retried")
        return super().handle_job_retry(job, queue, retry, *args, **kwargs)

    def handle_job_failure(self, job, queue, *args, **kwargs):
        metrics.job_done(job.origin, "stopped" if self._stopped_job_id == job.id
                         else "retried" if job.should_retry else "failed")
        return super().handle_job_failure(job, queue, *args, **kwargs)


# Imported once in the worker so every forked work-horse starts warm instead of
# importing and compiling them again for each job.
JOB_MODULES = (
    "partner_app.connections.jobs",
    "partner_app.sync.jobs",
    "partner_app.timeline.jobs",
    "partner_app.webhooks.jobs",
    "partner_app.webhooks.reconcile_jobs",
)


def prepare_for_fork(app: Flask) -> None:
    """Warm the parent, then make forking cheap and safe.

    No pooled database connection may cross a fork (SQLAlchemy pooling docs); job
    modules and mapper configuration are done once here, and ``gc.freeze()`` keeps the
    warm objects out of the children's collections, so copy-on-write pages stay shared.
    """
    from sqlalchemy.orm import configure_mappers

    from partner_app.db import db

    for name in JOB_MODULES:
        importlib.import_module(name)
    configure_mappers()
    with app.app_context():
        engine = db.engine
        engine.dispose()
    os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))
    gc.collect()
    gc.freeze()
