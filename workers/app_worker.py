"""An RQ worker that runs every job inside a fresh Flask application context."""

from __future__ import annotations

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


def prepare_for_fork(app: Flask) -> None:
    """No pooled database connection may cross a fork (SQLAlchemy pooling docs)."""
    from partner_app.db import db

    with app.app_context():
        engine = db.engine
        engine.dispose()
    os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))
