"""An RQ worker that runs every job inside a fresh Flask application context."""

from __future__ import annotations

import gc
import importlib
import os

from flask import Flask
from rq import Worker
from rq.serializers import JSONSerializer


class AppWorker(Worker):
    """Forks a work-horse per job (so a crash or kill -9 costs one job, not the worker)
    and gives each job its own app context, hence its own database session."""

    app: Flask

    def __init__(self, *args, app: Flask, **kwargs):
        kwargs.setdefault("serializer", JSONSerializer)
        super().__init__(*args, **kwargs)
        self.app = app

    def perform_job(self, job, queue, execution) -> bool:
        with self.app.app_context():
            try:
                return super().perform_job(job, queue, execution)
            finally:
                from partner_app.db import db

                db.session.remove()


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
