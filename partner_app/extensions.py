"""Unbound Flask extensions; ``create_app`` binds them. Nothing happens at import."""

from flask_login import LoginManager
from flask_migrate import Migrate
from flask_wtf.csrf import CSRFProtect

from partner_app.db import db

migrate = Migrate(render_as_batch=True)  # SQLite needs batch ALTERs
csrf = CSRFProtect()
login_manager = LoginManager()
login_manager.login_view = "dashboard.login"
login_manager.session_protection = "strong"

__all__ = ["csrf", "db", "login_manager", "migrate"]
