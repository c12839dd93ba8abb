"""StoraOAuth and StoraClient against the real sandbox process: the wire contract."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from partner_app.stora.client import StoraClient, storefront_host
from partner_app.stora.errors import (
    ApiUnavailable,
    InvalidGrant,
    NotFound,
    OAuthUnavailable,
    RateLimited,
    RequestRejected,
)
from partner_app.stora.oauth import StoraOAuth
from tests.consent import consent

LEEDS = "Leeds City Storage Ltd"


class StaticTokens:
    """A TokenSource with one token and a scripted replacement (counts its calls)."""

    def __init__(self, token: str, replacement: str | None = None):
        self.token, self.replacement, self.replacements = token, replacement, 0

    def access_token(self) -> str:
        return self.token

    def replace_rejected(self, rejected: str) -> str | None:
        self.replacements += 1
        return self.replacement


@pytest.fixture
def oauth(clean_app) -> StoraOAuth:
    return clean_app.extensions["stora_oauth"]


def authorize(oauth: StoraOAuth, operator: str = LEEDS):
    url = oauth.authorization_url(state="s" * 43, code_verifier="v" * 64)
    location = consent(url, operator_name=operator)
    code = parse_qs(urlsplit(location).query)["code"][0]
    return oauth.exchange_code(code=code, code_verifier="v" * 64)


def client_with(token: str, sandbox, **kwargs) -> StoraClient:
    return StoraClient(api_base=sandbox.base_url, tokens=StaticTokens(token, **kwargs),
                       timeout=(2, 2))


@pytest.mark.parametrize("token_auth", ["json_body", "form_body", "basic"])
def test_code_exchange_works_with_every_client_auth_method(clean_app, sandbox, token_auth):
    settings = clean_app.extensions["settings"]
    oauth = StoraOAuth(client_id=settings.stora_client_id,
                       client_secret=settings.stora_client_secret,
                       authorize_url=settings.stora_authorize_url,
                       api_base=settings.stora_api_base, redirect_uri=settings.redirect_uri,
                       scopes=settings.stora_scopes, token_auth=token_auth)
    tokens = authorize(oauth)
    assert tokens.access_token and tokens.refresh_token
    info = oauth.token_info(tokens.access_token)
    assert info.operator_name == LEEDS and "public.order:read" in info.scopes


def test_refresh_rotates_and_the_old_refresh_token_dies_on_first_use(oauth, sandbox):
    first = authorize(oauth)
    second = oauth.refresh(first.refresh_token)
    assert second.refresh_token != first.refresh_token
    client_with(second.access_token, sandbox).list_sites()  # first use of the new token
    with pytest.raises(InvalidGrant):
        oauth.refresh(first.refresh_token)


def test_pagination_follows_next_until_null(oauth, sandbox):
    tokens = authorize(oauth)
    client = client_with(tokens.access_token, sandbox)
    pages = list(client.iter_pages("orders", limit=25))
    first = pages[0].pagination
    assert len(pages) == first["pages"] > 1
    assert sum(len(p.items) for p in pages) == first["count"]
    ids = [o["id"] for p in pages for o in p.items]
    assert len(ids) == len(set(ids)) and all(i.startswith("order_") for i in ids)
    assert storefront_host(pages[0].meta) == "leeds-city-storage.stora.test"


def test_401_asks_the_token_source_once_and_retries_with_the_replacement(oauth, sandbox):
    tokens = authorize(oauth)
    tokens_source = StaticTokens("not-a-token", replacement=tokens.access_token)
    client = StoraClient(api_base=sandbox.base_url, tokens=tokens_source)
    assert client.list_sites()
    assert tokens_source.replacements == 1


def test_errors_map_to_the_typed_tree(oauth, sandbox):
    client = client_with(authorize(oauth).access_token, sandbox)
    with pytest.raises(NotFound):
        client.request("GET", "orders/order_0000000000000000")
    with pytest.raises(RequestRejected) as rejected:
        client.request("GET", "orders", params={"limit": 1000})
    assert rejected.value.status == 422 and rejected.value.request_id
    sandbox.admin("POST", "faults", json={"endpoint": "api", "status": 503})
    with pytest.raises(ApiUnavailable):
        client.list_sites()
    sandbox.admin("POST", "faults", json={"endpoint": "api", "status": 429,
                                          "headers": {"Retry-After": "7"}})
    with pytest.raises(RateLimited) as limited:
        client.list_sites()
    assert limited.value.retryable and limited.value.retry_after == 7
    sandbox.admin("POST", "faults", json={"endpoint": "api", "latency_ms": 3000})
    with pytest.raises(ApiUnavailable):
        client.list_sites()


def test_token_endpoint_faults_are_retryable(oauth, sandbox):
    tokens = authorize(oauth)
    for fault in ({"status": 500}, {"status": 429}, {"mode": "malformed_json"},
                  {"mode": "drop_after_commit"}):
        sandbox.admin("POST", "faults", json={"endpoint": "token", **fault})
        with pytest.raises(OAuthUnavailable):
            oauth.refresh(tokens.refresh_token)
