"""Gunicorn settings for ``wsgi:app`` in production: ``gunicorn -c deploy/gunicorn.conf.py wsgi:app``.

Every value can be set from the environment, so one file serves every web machine:

* ``GUNICORN_BIND`` (default ``0.0.0.0:${PORT:-8000}``);
* ``WEB_CONCURRENCY`` worker processes (default 2 per core, at most 8) and
  ``GUNICORN_THREADS`` threads each (default 4): the app waits on PostgreSQL, Redis and,
  in the OAuth callback, on Stora, so threads (``gthread``) are cheaper than processes;
* ``GUNICORN_TIMEOUT`` (default 30 s): a worker silent for longer is killed and replaced.
  The slowest request is the OAuth callback, two Stora calls bounded by
  ``HTTP_CONNECT_TIMEOUT + HTTP_READ_TIMEOUT`` each;
* ``GUNICORN_GRACEFUL_TIMEOUT`` (default 25 s): on SIGTERM a worker stops accepting and
  finishes its requests within this time. Keep it below the orchestrator's kill delay
  (Docker and Kubernetes wait 30 s by default before SIGKILL);
* ``FORWARDED_ALLOW_IPS`` (default ``127.0.0.1``): the proxies whose
  ``X-Forwarded-*`` headers are trusted. Set it to the load balancer's addresses; ``*``
  only when nothing but the load balancer can reach this port.

The access log goes through ``RedactingLogger`` with a format that logs the path
without its query string (``%(U)s``): the OAuth callback's ``code`` and ``state`` and
the secrets in install-link and webhook paths never reach a log.
"""

from __future__ import annotations

import multiprocessing
import os


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


bind = os.environ.get("GUNICORN_BIND") or f"0.0.0.0:{_int('PORT', 8000)}"
workers = _int("WEB_CONCURRENCY", min(2 * multiprocessing.cpu_count(), 8))
worker_class = "gthread"
threads = _int("GUNICORN_THREADS", 4)
timeout = _int("GUNICORN_TIMEOUT", 30)
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 25)
keepalive = 5
# A worker is replaced after this many requests (with jitter, so they do not all
# restart together): bounds the effect of any slow leak.
max_requests = _int("GUNICORN_MAX_REQUESTS", 5000)
max_requests_jitter = max_requests // 10
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")

accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms'
logger_class = "partner_app.access_log.RedactingLogger"

# Gunicorn's control socket is a file in the working directory; containers and
# read-only roots have no use for it.
control_socket_disable = True
# The app is built per worker after the fork: no database connection or Redis pool
# is shared between workers.
preload_app = False

# Server hooks shared with ``partner-app web``: a dead worker's metrics are dropped from
# the shared ``PROMETHEUS_MULTIPROC_DIR`` files (set it, one directory per machine).
from partner_app.gunicorn_conf import child_exit, when_ready  # noqa: E402,F401
