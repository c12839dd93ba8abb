"""The Stora partner integration platform. ``create_app`` builds it; importing does nothing."""

from __future__ import annotations

from pathlib import Path

from flask import Flask, render_template

from partner_app.settings import Settings

MIGRATIONS_DIR = str(Path(__file__).resolve().parent.parent / "migrations")


def create_app(settings: Settings | None = None) -> Flask:
    """Build the web/worker/CLI application from settings (default: the environment)."""
    from partner_app import logging as app_logging
    from partner_app import metrics, queueing, security_headers
    from partner_app.connections.views import bp as connections_bp
    from partner_app.dashboard import bp as dashboard_bp
    from partner_app.db import ping_when_idle
    from partner_app.extensions import csrf, db, login_manager, migrate
    from partner_app.health import bp as health_bp
    from partner_app.logging import configure_logging
    from partner_app.security import staff
    from partner_app.security.vault import Vault
    from partner_app.stora.oauth import StoraOAuth
    from partner_app.webhooks.views import bp as webhooks_bp

    settings = settings or Settings.from_env()
    configure_logging(settings)
    Path(settings.instance_path).mkdir(parents=True, exist_ok=True)
    app = Flask(__name__, instance_path=str(Path(settings.instance_path).resolve()))
    app.config.update(
        SECRET_KEY=settings.secret_key,
        SQLALCHEMY_DATABASE_URI=settings.database_url,
        # Liveness checks on checkout come from db.ping_when_idle, below. Statement
        # parameters stay out of errors and logs: they carry operators' data.
        SQLALCHEMY_ENGINE_OPTIONS={"pool_pre_ping": False, "hide_parameters": True},
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        REMEMBER_COOKIE_SECURE=settings.secure_cookies,
        REMEMBER_COOKIE_HTTPONLY=True,
        WTF_CSRF_TIME_LIMIT=3600,
        TESTING=settings.mode == "test",
    )
    app.extensions["settings"] = settings
    app.extensions["vault"] = Vault.from_settings(settings.encryption_keys)
    app.extensions["stora_oauth"] = StoraOAuth(
        client_id=settings.stora_client_id,
        client_secret=settings.stora_client_secret,
        authorize_url=settings.stora_authorize_url,
        api_base=settings.stora_api_base,
        redirect_uri=settings.redirect_uri,
        scopes=settings.stora_scopes,
        token_auth=settings.stora_token_auth,
        timeout=(settings.http_connect_timeout, settings.http_read_timeout),
    )

    app_logging.init_app(app)
    metrics.init_app(app)
    db.init_app(app)
    with app.app_context():
        ping_when_idle(db.engine)
    migrate.init_app(app, db, directory=MIGRATIONS_DIR)
    csrf.init_app(app)
    login_manager.init_app(app)
    staff.init_app(app)
    queueing.init_app(app)
    _import_models()

    app.register_blueprint(connections_bp)
    app.register_blueprint(dashboard_bp)
    app.register_blueprint(webhooks_bp)
    app.register_blueprint(health_bp)

    security_headers.init_app(app)

    @app.errorhandler(404)
    def not_found(error) -> tuple[str, int]:
        return render_template("error.html", title="Not found",
                               message="There is nothing at this address."), 404

    @app.errorhandler(500)
    def server_error(error) -> tuple[str, int]:
        db.session.rollback()
        return render_template("error.html", title="Something went wrong",
                               message="The error was logged. Please try again."), 500

    return app


def _import_models() -> None:
    """Register every model on the metadata (migrations and create_all see them all)."""
    from partner_app import audit, incidents  # noqa: F401
    from partner_app.connections import models  # noqa: F401
    from partner_app.lifecycle import models as lifecycle_models  # noqa: F401
    from partner_app.security import models as security_models  # noqa: F401
    from partner_app.sync import models as sync_models  # noqa: F401
    from partner_app.timeline import models as timeline_models  # noqa: F401
    from partner_app.webhooks import models as webhook_models  # noqa: F401
