"""T-17: schemathesis against ``docs/openapi.yaml`` and the app itself (WSGI, in process,
real database and Redis).

Positive cases (inputs the description allows) must get a response whose status,
content type, headers and body are as described; negative cases (inputs it forbids)
must never get a 5xx the description does not promise.

The webhook receiver gets a live subscription: hypothesis chooses whether a case goes
to its real route key, and (positive cases) whether the generated body is signed with
its secret, so the signature, envelope and storage paths are reached, not only 404.

Each operation runs as its own hypothesis test over schemathesis's strategy (the
strategies are the library's; the lazy pytest loader does not run under pytest 9).
"""

from __future__ import annotations

import json
import time

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from partner_app.stora.signatures import HEADER, sign
from tests.conftest import ROOT
from tests.integration.test_webhook_receiver import make_hook

SPEC = ROOT / "docs" / "openapi.yaml"
SCHEMA = schemathesis.openapi.from_path(SPEC)
OPERATIONS = {result.ok().label: result.ok() for result in SCHEMA.get_all_operations()}
CONFORMANCE = [status_code_conformance, content_type_conformance,
               response_headers_conformance, response_schema_conformance]
#: Operations the description promises before the app routes them (built in parallel).
NOT_YET_ROUTED_OK = {"GET /readyz"}
WEBHOOK = "POST /webhooks/stora/{route_key}"


def test_the_description_covers_the_public_surface():
    assert set(OPERATIONS) >= {
        "GET /install", "GET /install/{secret}", "GET /oauth/callback", "GET /install/result",
        "POST /webhooks/stora/{route_key}", "GET /healthz", "GET /readyz"}


def _routed(app, operation) -> bool:
    rule = operation.path.replace("{", "<").replace("}", ">")
    return any(r.rule == rule for r in app.url_map.iter_rules())


def _allowed_5xx(operation, status: int) -> bool:
    return str(status) in operation.definition.raw.get("responses", {})


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_the_public_surface_behaves_as_described(client, label, mode):
    operation = OPERATIONS[label]
    if not _routed(client.application, operation):
        assert label in NOT_YET_ROUTED_OK, f"{label} is described but not routed"
        pytest.skip(f"{label} is not routed yet")
    SCHEMA.app = client.application
    hook = make_hook(client.application) if label == WEBHOOK else None
    seen: list[int] = []

    def send(case, data):
        if hook is None:
            return case.call(app=client.application)
        if data.draw(hypothesis.strategies.booleans(), label="to the live route"):
            case.path_parameters["route_key"] = hook.route_key
        if mode is GenerationMode.POSITIVE and data.draw(hypothesis.strategies.booleans(),
                                                         label="signed"):
            raw = json.dumps(case.body).encode()
            return client.post(f"/webhooks/stora/{case.path_parameters['route_key']}",
                               data=raw, headers={
                                   "Content-Type": "application/json",
                                   HEADER: sign(raw, hook.secret, int(time.time()))})
        return case.call(app=client.application)

    @hypothesis.settings(max_examples=40 if hook else 30, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode),
                      data=hypothesis.strategies.data())
    def run(case, data):
        response = send(case, data)
        seen.append(response.status_code)
        if not (response.status_code >= 500 and _allowed_5xx(operation, response.status_code)):
            case.validate_response(response, checks=[not_a_server_error])
        if mode is GenerationMode.POSITIVE:
            case.validate_response(response, checks=CONFORMANCE)

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        pytest.skip(f"{label}: no {mode.value} inputs exist")
    assert seen
    if hook is not None and mode is GenerationMode.POSITIVE:
        assert {200, 404} <= set(seen) and (set(seen) & {400, 401}), seen
