"""stora_sandbox: a local imitation of the Stora Public API for tests and demos.

An OAuth 2.0 authorization server with Doorkeeper semantics (``/oauth2/...``), a
read-only slice of the versioned REST API (``/2025-09/...``) and an admin/test API
(``/_sandbox/...``) for seeding data, flipping behaviour switches, injecting faults and
inspecting requests and issued tokens.

It is an independent implementation of the other side of the wire: it never imports
``partner_app``, so a bug there shows up in tests instead of being mirrored here.

Build it with :func:`create_app`; run it with ``python -m stora_sandbox``.
"""

from __future__ import annotations

from flask import Flask, Response

from stora_sandbox import admin, api, hooks, oauth, seed
from stora_sandbox.config import ApplicationSpec, SandboxConfig, Switches
from stora_sandbox.faults import ConnectionDropped, DropConnectionMiddleware
from stora_sandbox.store import Store
from stora_sandbox.wire import stora_error

__all__ = ["ApplicationSpec", "ConnectionDropped", "SandboxConfig", "Switches", "create_app"]


def create_app(config: SandboxConfig | None = None) -> Flask:
    """Build a sandbox app with its own empty store, then register and seed.

    The store is ``app.extensions["stora_sandbox"]`` and the config
    ``app.extensions["stora_sandbox.config"]``.

    Raises:
        ValueError: ``config.seed`` names an unknown seed.
    """
    config = config or SandboxConfig()
    app = Flask(__name__, static_folder=None)
    # Keep the documented field order (ids first) instead of alphabetising keys.
    app.json.sort_keys = False  # type: ignore[attr-defined]

    store = Store(config.switches, config.clock)
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
