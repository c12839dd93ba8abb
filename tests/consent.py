"""Drive the sandbox's consent page the way a browser would: GET the page, read the
form, choose an operator by its visible name, submit a decision."""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urljoin

import requests


class _FormReader(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self.options: dict[str, str] = {}  # visible text -> value
        self._option_value: str | None = None
        self._in_form = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form" and (attrs.get("method") or "").lower() == "post":
            self._in_form = True
            self.action = attrs.get("action") or ""
        elif self._in_form and tag == "input" and attrs.get("type") == "hidden":
            self.fields[attrs["name"]] = attrs.get("value") or ""
        elif self._in_form and tag == "option":
            self._option_value = attrs.get("value")

    def handle_data(self, data):
        if self._option_value is not None and data.strip():
            self.options[data.strip()] = self._option_value
            self._option_value = None

    def handle_endtag(self, tag):
        if tag == "form":
            self._in_form = False


def consent(authorize_url: str, *, operator_name: str | None = None,
            decision: str = "approve", session: requests.Session | None = None) -> str:
    """Return the Location Stora redirects the browser to after the decision."""
    http = session or requests.Session()
    page = http.get(authorize_url, timeout=10)
    page.raise_for_status()
    form = _FormReader()
    form.feed(page.text)
    if not form.options:
        raise AssertionError("consent page lists no operators")
    name = operator_name or next(iter(form.options))
    matches = [value for text, value in form.options.items() if text.startswith(name)]
    if not matches:
        raise AssertionError(f"operator {name!r} not offered; offered: {list(form.options)}")
    data = {**form.fields, "operator_id": matches[0], "decision": decision}
    resp = http.post(urljoin(page.url, form.action or page.url), data=data,
                     allow_redirects=False, timeout=10)
    if resp.status_code not in (302, 303):
        raise AssertionError(f"consent answered {resp.status_code}, not a redirect")
    return resp.headers["Location"]


def offered_operators(authorize_url: str) -> list[str]:
    page = requests.get(authorize_url, timeout=10)
    form = _FormReader()
    form.feed(page.text)
    return list(form.options)
