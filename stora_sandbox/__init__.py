"""stora_sandbox: a local imitation of the Stora Public API for tests and demos.

An OAuth 2.0 authorization server with Doorkeeper semantics (``/oauth2/...``), a slice
of the versioned REST API (``/2025-09/...``: sites, contacts, orders, the timeline and
webhook endpoints) with Stora's rate limits and idempotency keys, signed webhook
delivery with retries, and an admin/test API (``/_sandbox/...``) for seeding data,
flipping behaviour switches, injecting faults and inspecting requests, issued tokens,
recorded timeline events and webhook attempts.

It is an independent implementation of the other side of the wire: it never imports
``partner_app``, so a bug there shows up in tests instead of being mirrored here.

Build it with :func:`create_app`; run it with ``python -m stora_sandbox``.
"""

from __future__ import annotations

from flask import Flask, Response

from stora_sandbox import admin, api, hooks, oauth, seed

# These add their routes to api.bp on import, which must happen before it is registered.
from stora_sandbox import endpoints, timeline  # noqa: F401  # isort: skip
from stora_sandbox.config import ApplicationSpec, SandboxConfig, Switches
from stora_sandbox.faults import ConnectionDropped, DropConnectionMiddleware
from stora_sandbox.store import Store
from stora_sandbox.webhooks import Dispatcher
from stora_sandbox.wire import stora_error

__all__ = ["ApplicationSpec", "ConnectionDropped", "SandboxConfig", "Switches", "create_app"]


def create_app(config: SandboxConfig | None = None) -> Flask:
    """Build a sandbox app with its own empty store, then register and seed.

    The store is ``app.extensions["stora_sandbox"]`` and the config
    ``app.extensions["stora_sandbox.config"]``. The webhook dispatcher is
    ``store.dispatcher``; its thread starts on the first delivery, and whoever runs the
    app should call ``store.dispatcher.stop()`` when done with it.

    Raises:
        ValueError: ``config.seed`` names an unknown seed.
    """
    config = config or SandboxConfig()
    app = Flask(__name__, static_folder=None)
    # Keep the documented field order (ids first) instead of alphabetising keys.
    app.json.sort_keys = False  # type: ignore[attr-defined]

    store = Store(config.switches, config.clock, canary=config.canary)
    store.dispatcher = Dispatcher(store)
    for spec in config.applications:
        store.upsert_application(spec)
    seed.apply_seed(store, config.seed)
    app.extensions["stora_sandbox"] = store
    app.extensions["stora_sandbox.config"] = config

    hooks.install(app, store)
    app.register_blueprint(oauth.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(admin.bp)

    @app.errorhandler(404)
    def not_found(_error: Exception) -> Response:
        return stora_error("invalid_endpoint", "The requested endpoint does not exist.")

    @app.errorhandler(405)
    def wrong_method(_error: Exception) -> Response:
        # Rails routes by method too, so a wrong method is an unknown endpoint at Stora.
        return stora_error("invalid_endpoint", "The requested endpoint does not exist.")

    @app.errorhandler(500)
    def server_error(_error: Exception) -> Response:
        return stora_error("internal_server_error", "An unexpected error occurred.")

    app.wsgi_app = DropConnectionMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    return app
