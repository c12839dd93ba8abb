"""Fixtures for the sandbox's own tests: an in-process app with a controllable clock.

Each app's webhook dispatcher is stopped when its test ends, so no delivery thread
outlives the test that started it.

Fixture names avoid the root conftest's (``app``, ``client``, ``sandbox``), which build
the partner app; these tests only ever talk to ``stora_sandbox``. Helpers live in
``tests/sandbox/support.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from stora_sandbox import ApplicationSpec, SandboxConfig, create_app
from stora_sandbox.store import Store
from tests.sandbox.support import (
    CLIENT_ID,
    CLIENT_SECRET,
    OTHER_CLIENT_ID,
    OTHER_CLIENT_SECRET,
    OTHER_REDIRECT_URI,
    REDIRECT_URI,
    FakeClock,
    OAuth,
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sandbox_config(clock: FakeClock) -> SandboxConfig:
    return SandboxConfig(
        applications=(
            ApplicationSpec(CLIENT_ID, CLIENT_SECRET, (REDIRECT_URI,), name="Partner Test App"),
            ApplicationSpec(OTHER_CLIENT_ID, OTHER_CLIENT_SECRET, (OTHER_REDIRECT_URI,)),
        ),
        seed="demo",
        clock=clock,
    )


@pytest.fixture
def sandbox_app(sandbox_config: SandboxConfig) -> Iterator[Flask]:
    app = create_app(sandbox_config)
    app.testing = True
    yield app
    app.extensions["stora_sandbox"].dispatcher.stop(timeout=5)


@pytest.fixture
def store(sandbox_app: Flask) -> Store:
    return sandbox_app.extensions["stora_sandbox"]


@pytest.fixture
def http(sandbox_app: Flask) -> FlaskClient:
    return sandbox_app.test_client()


@pytest.fixture
def oauth(http: FlaskClient, store: Store) -> OAuth:
    return OAuth(http, store)
