"""The end-to-end ``stack`` fixture (web + worker processes) for the browser check."""

from tests.e2e.conftest import stack  # noqa: F401
