"""GET/POST /oauth2/authorize: consent page, errors that never redirect, errors that do."""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urlencode, urlsplit

import pytest

from tests.sandbox.support import CLIENT_ID, REDIRECT_URI, OAuth, query_of


class FormParser(HTMLParser):
    """Collects the consent form's hidden fields, select options and buttons."""

    def __init__(self) -> None:
        super().__init__()
        self.method: str | None = None
        self.hidden: dict[str, str] = {}
        self.options: list[tuple[str, str]] = []
        self.buttons: list[tuple[str, str]] = []
        self.title = ""
        self._option: str | None = None
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.method = a.get("method")
        elif tag == "input" and a.get("type") == "hidden":
            self.hidden[a["name"]] = a.get("value", "")
        elif tag == "option":
            self._option = a["value"]
        elif tag == "button":
            self.buttons.append((a["name"], a["value"]))
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._option is not None and data.strip():
            self.options.append((self._option, data.strip()))
            self._option = None
        if self._in_title:
            self.title += data


def test_consent_page_lists_app_scopes_operators_and_carries_parameters(oauth: OAuth) -> None:
    params = oauth.authorize_params(code_challenge="abc" * 15, code_challenge_method="S256")
    response = oauth.client.get(f"/oauth2/authorize?{urlencode(params)}")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    form = FormParser()
    form.feed(page)
    assert "Partner Test App" in form.title
    for scope in params["scope"].split():
        assert scope in page
    assert form.method == "post"
    assert form.hidden == {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": params["scope"],
        "state": "state-123",
        "code_challenge": "abc" * 15,
        "code_challenge_method": "S256",
    }
    assert [name for _id, name in form.options] == [
        "Leeds City Storage Ltd",
        "Bristol Box Rooms",
        "Camden Self Store",
    ]
    assert {op.id for op in oauth.store.list_operators()} == {i for i, _ in form.options}
    assert sorted(form.buttons) == [("decision", "approve"), ("decision", "deny")]
    # Self-contained page: inline CSS only, no scripts or external assets.
    assert "<script" not in page and "<link" not in page and "src=" not in page


def test_submitting_the_parsed_form_issues_a_code(oauth: OAuth) -> None:
    params = oauth.authorize_params()
    form = FormParser()
    form.feed(oauth.client.get(f"/oauth2/authorize?{urlencode(params)}").get_data(as_text=True))
    bristol = next(i for i, name in form.options if name == "Bristol Box Rooms")
    response = oauth.client.post(
        "/oauth2/authorize", data={**form.hidden, "operator_id": bristol, "decision": "approve"}
    )
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.startswith(REDIRECT_URI + "?")
    assert set(query_of(location)) == {"code", "state"}
    grant = oauth.store.grants[query_of(location)["code"]]
    assert grant.operator_id == bristol
    assert grant.scopes == tuple(params["scope"].split())


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"client_id": "nope"}, "Unknown client"),
        ({"client_id": ""}, "Unknown client"),
        ({"redirect_uri": "https://evil.example/cb"}, "redirect_uri"),
        ({"redirect_uri": REDIRECT_URI + "/"}, "redirect_uri"),
        ({"redirect_uri": REDIRECT_URI + "?x=1"}, "redirect_uri"),
        ({"redirect_uri": ""}, "redirect_uri"),
    ],
)
def test_bad_client_or_redirect_uri_is_a_400_page_never_a_redirect(
    oauth: OAuth, overrides: dict[str, str], reason: str
) -> None:
    params = oauth.authorize_params(**overrides)
    for response in (
        oauth.client.get(f"/oauth2/authorize?{urlencode(params)}"),
        oauth.decide(**overrides),
    ):
        assert response.status_code == 400
        assert "Location" not in response.headers
        assert response.mimetype == "text/html"
        assert reason in response.get_data(as_text=True)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"response_type": ""}, "invalid_request"),
        ({"scope": "public.order:read public.nonsense:read"}, "invalid_scope"),
        ({"scope": ""}, "invalid_scope"),
        ({"code_challenge": "x" * 43, "code_challenge_method": "S512"}, "invalid_request"),
        ({"code_challenge": "x" * 43, "code_challenge_method": ""}, "invalid_request"),
    ],
)
def test_other_errors_redirect_with_error_and_state(
    oauth: OAuth, overrides: dict[str, str], error: str
) -> None:
    params = oauth.authorize_params(**overrides)
    response = oauth.client.get(f"/oauth2/authorize?{urlencode(params)}")
    assert response.status_code == 302
    query = query_of(response.headers["Location"])
    assert query["error"] == error
    assert query["error_description"]
    assert query["state"] == "state-123"
    assert "code" not in query


def test_plain_pkce_follows_the_pkce_methods_switch(oauth: OAuth) -> None:
    params = oauth.authorize_params(code_challenge="v" * 43, code_challenge_method="plain")
    url = f"/oauth2/authorize?{urlencode(params)}"
    assert oauth.client.get(url).status_code == 200
    oauth.patch_config(pkce_methods="S256")
    response = oauth.client.get(url)
    assert query_of(response.headers["Location"])["error"] == "invalid_request"


def test_force_pkce_requires_a_challenge(oauth: OAuth) -> None:
    url = f"/oauth2/authorize?{urlencode(oauth.authorize_params())}"
    assert oauth.client.get(url).status_code == 200
    oauth.patch_config(force_pkce=True)
    query = query_of(oauth.client.get(url).headers["Location"])
    assert query["error"] == "invalid_request"
    assert "code_challenge" in query["error_description"]


def test_default_scopes_switch_fills_a_missing_scope(oauth: OAuth) -> None:
    oauth.patch_config(default_scopes="public.order:read")
    code = oauth.code(scope="")
    assert oauth.store.grants[code].scopes == ("public.order:read",)


def test_scope_outside_the_applications_allowance_is_invalid_scope(oauth: OAuth) -> None:
    oauth.client.post(
        "/_sandbox/applications",
        json={
            "client_id": CLIENT_ID,
            "client_secret": "s",
            "redirect_uris": [REDIRECT_URI],
            "scopes": ["public.order:read"],
        },
    )
    params = oauth.authorize_params(scope="public.order:read public.site:read")
    response = oauth.client.get(f"/oauth2/authorize?{urlencode(params)}")
    assert query_of(response.headers["Location"])["error"] == "invalid_scope"


def test_deny_redirects_with_access_denied_and_state(oauth: OAuth) -> None:
    response = oauth.decide("deny")
    assert response.status_code == 302
    query = query_of(response.headers["Location"])
    assert query["error"] == "access_denied"
    assert query["error_description"]
    assert query["state"] == "state-123"
    assert not oauth.store.grants


def test_state_is_omitted_when_not_sent(oauth: OAuth) -> None:
    response = oauth.decide(state="")
    assert set(query_of(response.headers["Location"])) == {"code"}


def test_existing_query_parameters_of_the_redirect_uri_are_kept(oauth: OAuth) -> None:
    uri = "https://partner.example/cb?tenant=7&flag="
    oauth.client.post(
        "/_sandbox/applications",
        json={"client_id": CLIENT_ID, "client_secret": "s", "redirect_uris": [uri]},
    )
    location = oauth.decide(redirect_uri=uri).headers["Location"]
    parts = urlsplit(location)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "https://partner.example/cb"
    assert parts.query.startswith("tenant=7&flag=&code=")
    assert query_of(location)["state"] == "state-123"


def test_approve_needs_a_known_operator_and_a_known_decision(oauth: OAuth) -> None:
    assert oauth.decide(operator_id="opr_missing").status_code == 400
    assert oauth.decide("maybe").status_code == 400
    assert not oauth.store.grants


def test_code_carries_binding_and_expiry(oauth: OAuth) -> None:
    code = oauth.code(code_challenge="c" * 43, code_challenge_method="S256")
    grant = oauth.store.grants[code]
    assert grant.client_id == CLIENT_ID
    assert grant.redirect_uri == REDIRECT_URI
    assert grant.code_challenge == "c" * 43
    assert grant.code_challenge_method == "S256"
    assert grant.expires_at - grant.created_at == 600
