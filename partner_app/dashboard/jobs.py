"""The jobs page: RQ's queues, running and failed jobs (retry, delete), and sync runs."""

from __future__ import annotations

import logging

from flask import flash, redirect, render_template, url_for
from flask_login import current_user
from redis.exceptions import RedisError

from partner_app import queue_admin
from partner_app.dashboard import queries
from partner_app.dashboard.blueprint import admin_required, bp
from partner_app.dashboard.forms import ConfirmForm
from partner_app.db import db
from partner_app.queueing import get_redis

log = logging.getLogger(__name__)

# Each listed failed job costs Redis round trips (its hash, its latest result).
LISTED_PER_QUEUE = 20


@bp.get("/jobs")
def jobs():
    redis = get_redis()
    try:
        counts = queue_admin.queue_counts(redis)
        running = queue_admin.running_jobs(redis, limit=LISTED_PER_QUEUE)
        failed = queue_admin.failed_jobs(redis, limit=LISTED_PER_QUEUE)
    except RedisError:
        log.warning("dashboard.redis_unavailable", exc_info=True)
        flash("Redis cannot be reached: queues and jobs are not shown.", "error")
        counts, running, failed = None, [], []
    public_ids = queries.operator_public_ids(
        op for job in running + failed for op in job.operator_ids)
    return render_template("dashboard/jobs.html", counts=counts, running=running,
                           failed=failed, public_ids=public_ids,
                           runs=queries.sync_runs(limit=20), form=ConfirmForm(),
                           limit=LISTED_PER_QUEUE)


@bp.post("/jobs/<queue>/<job_id>/requeue")
@admin_required
def requeue_job(queue: str, job_id: str):
    if not ConfirmForm().validate_on_submit():
        flash("The form expired; please try again.", "error")
        return redirect(url_for("dashboard.jobs"))
    try:
        queue_admin.requeue_failed(get_redis(), queue, job_id, actor=current_user.email,
                                   by_staff_id=current_user.id)
    except queue_admin.JobNotFound as exc:
        flash(f"Nothing was retried: {exc}.", "error")
        return redirect(url_for("dashboard.jobs"))
    db.session.commit()
    flash(f"Job {job_id} is queued again on {queue}.", "info")
    return redirect(url_for("dashboard.jobs"))


@bp.route("/jobs/<queue>/<job_id>/delete", methods=["GET", "POST"])
@admin_required
def delete_job(queue: str, job_id: str):
    """GET asks for confirmation (a failed job's record is gone for good); POST deletes."""
    form = ConfirmForm()
    if not form.validate_on_submit():
        return render_template("dashboard/job_delete.html", queue=queue, job_id=job_id,
                               form=form)
    try:
        queue_admin.delete_failed(get_redis(), queue, job_id, actor=current_user.email,
                                  by_staff_id=current_user.id)
    except queue_admin.JobNotFound as exc:
        flash(f"Nothing was deleted: {exc}.", "error")
        return redirect(url_for("dashboard.jobs"))
    db.session.commit()
    flash(f"Failed job {job_id} was deleted.", "info")
    return redirect(url_for("dashboard.jobs"))
