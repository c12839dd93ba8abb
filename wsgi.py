"""WSGI entry point: ``gunicorn wsgi:app``."""

from partner_app import create_app

app = create_app()
