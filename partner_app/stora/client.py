"""The Stora Public API client, one instance per operator.

Only this module and ``stora/oauth.py`` speak HTTP to Stora. Every call has connect and
read timeouts and ends in a JSON body or a typed ``ApiError``. Tokens come from a
``TokenSource`` the caller supplies, so the client never stores or refreshes one itself;
on a 401 it asks the source once for a replacement and retries once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import msgspec
import requests

from partner_app import metrics
from partner_app.stora.errors import (
    ApiError,
    ApiUnavailable,
    Forbidden,
    NotFound,
    RateLimited,
    RequestRejected,
    Unauthorized,
)

log = logging.getLogger(__name__)

_json_decoder = msgspec.json.Decoder()

API_VERSION = "2025-09"
MAX_PAGE_SIZE = 100


class TokenSource(Protocol):
    """Where the client gets access tokens for its operator."""

    def access_token(self) -> str:
        """A token believed valid now."""
        ...

    def replace_rejected(self, rejected: str) -> str | None:
        """Stora rejected ``rejected`` with 401: return a token worth one retry, or None."""
        ...


class RateLimiter(Protocol):
    """Shared admission control for calls to Stora (see ``stora/ratelimit.py``)."""

    def acquire(self, key: str, *, kind: str = "api") -> None:
        """Return when a call for ``key`` may go out now. Waits briefly; raises
        ``RateLimitWait`` (retryable, with ``retry_after``) rather than wait long."""
        ...

    def backoff(self, key: str, seconds: float) -> None:
        """Stora answered 429 for ``key``: no caller may call for it for ``seconds``."""
        ...


@dataclass(frozen=True)
class Page:
    """One page of a list endpoint, unwrapped from Stora's envelope."""

    items: list[dict[str, Any]]
    pagination: dict[str, Any]
    meta: dict[str, Any]

    @property
    def next_page(self) -> int | None:
        nxt = self.pagination.get("next")
        return nxt if isinstance(nxt, int) and not isinstance(nxt, bool) else None


_sessions = threading.local()


def shared_session(api_base: str) -> requests.Session:
    """This thread's keep-alive session for ``api_base``, reused by every client it makes.

    A session per client would open a new connection to Stora for each job. The
    environment's proxy and CA settings (``HTTPS_PROXY``, ``NO_PROXY``,
    ``REQUESTS_CA_BUNDLE`` …) are resolved once here instead of on every request,
    where scanning ``os.environ`` cost more CPU than the rest of ``requests``. A
    forked process starts with sessions of its own: a socket must not be shared with
    the parent.
    """
    cache = getattr(_sessions, "by_base", None)
    if cache is None or getattr(_sessions, "pid", None) != os.getpid():
        cache = _sessions.by_base = {}
        _sessions.pid = os.getpid()
    session = cache.get(api_base)
    if session is None:
        session = requests.Session()
        settings = session.merge_environment_settings(api_base, {}, None, None, None)
        session.proxies.update(settings["proxies"])
        session.verify = settings["verify"]
        session.trust_env = False
        cache[api_base] = session
    return session


def storefront_host(meta: dict[str, Any]) -> str | None:
    """The operator's storefront host from ``meta.curies`` (the ``sf`` curie), if any."""
    for curie in meta.get("curies") or []:
        if isinstance(curie, dict) and curie.get("name") == "sf":
            href = str(curie.get("href") or "")
            host = href.split("://", 1)[-1].split("/", 1)[0].replace("{rel}", "")
            return host or None
    return None


def retry_after(resp: requests.Response) -> float | None:
    """Seconds Stora asks us to wait: ``Retry-After``, else ``RateLimit-Reset``.

    ``RateLimit-Reset`` is an epoch time on Stora's clock, so it is measured against the
    response's own ``Date`` header when present: a worker whose clock is ten minutes off
    still waits the right time.
    """
    raw = resp.headers.get("Retry-After")
    if raw:
        try:
            return max(0.0, float(raw))
        except ValueError:
            pass
    reset = resp.headers.get("RateLimit-Reset")
    if not reset:
        return None
    try:
        value = float(reset)
    except ValueError:
        return None
    if value < 1e9:  # a delta, not an epoch time
        return max(0.0, value)
    server_now = time.time()
    if resp.headers.get("Date"):
        with contextlib.suppress(TypeError, ValueError):
            server_now = parsedate_to_datetime(resp.headers["Date"]).timestamp()
    # Date has whole-second resolution: round the wait up rather than down.
    return max(0.0, value - server_now) + 0.5


def error_for(resp: requests.Response) -> ApiError:
    """Map a non-2xx response to the typed error tree."""
    # Stora's error message may echo request input, so only the code and request id
    # travel into our exceptions and logs.
    code = request_id = None
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        code, request_id = err.get("code"), err.get("request_id")
    request_id = request_id or resp.headers.get("X-Request-Id")
    status = resp.status_code
    text = f"{resp.request.method} {resp.request.path_url.split('?')[0]} -> {status}" \
        f"{' ' + code if code else ''}"
    kwargs = {"status": status, "code": code, "request_id": request_id}
    if status == 429:
        return RateLimited(text, retry_after=retry_after(resp), **kwargs)
    if status >= 500:
        return ApiUnavailable(text, retry_after=retry_after(resp), **kwargs)
    if status == 401:
        return Unauthorized(text, **kwargs)
    if status == 403:
        return Forbidden(text, **kwargs)
    if status == 404:
        return NotFound(text, **kwargs)
    return RequestRejected(text, **kwargs)


class StoraClient:
    """Calls ``{api_base}/{version}/…`` for one operator."""

    def __init__(self, *, api_base: str, tokens: TokenSource, version: str = API_VERSION,
                 timeout: tuple[float, float] = (3.0, 10.0),
                 session: requests.Session | None = None,
                 limiter: RateLimiter | None = None, limiter_key: str | None = None):
        self.api_base = api_base.rstrip("/")
        self.version = version
        self.timeout = timeout
        self._tokens = tokens
        self._session = session or requests.Session()
        self._limiter = limiter
        self._limiter_key = limiter_key or "default"

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                json: dict[str, Any] | None = None,
                idempotency_key: str | None = None) -> dict[str, Any]:
        """One API call with at most one 401-driven retry. Returns the decoded JSON body.

        POSTs always carry an ``Idempotency-Key``; pass the same key when retrying the
        same logical operation so Stora replays instead of repeating it.
        """
        url = f"{self.api_base}/{self.version}/{path.lstrip('/')}"
        headers = {"Accept": "application/json"}
        if method.upper() == "POST":
            headers["Idempotency-Key"] = idempotency_key or str(uuid.uuid4())
        token = self._tokens.access_token()
        for attempt in (1, 2):
            resp = self._send(method, url, params, json, headers, token)
            if resp.status_code == 401 and attempt == 1:
                replacement = self._tokens.replace_rejected(token)
                if replacement is not None:
                    token = replacement
                    continue
            break
        if not 200 <= resp.status_code < 300:
            error = error_for(resp)
            log.warning("stora.api_error", extra={
                "method": method, "path": path, "status": resp.status_code,
                "code": error.code, "stora_request_id": error.request_id})
            raise error
        try:
            # msgspec: a page of 100 orders decodes several times faster than with
            # the standard library, and decoding was a sync call's largest CPU cost.
            body = _json_decoder.decode(resp.content)
        except ValueError as exc:
            raise ApiUnavailable(f"{method} {path}: unreadable JSON",
                                 status=resp.status_code) from exc
        if not isinstance(body, dict):
            raise ApiUnavailable(f"{method} {path}: body is not an object",
                                 status=resp.status_code)
        log.debug("stora.api_call", extra={
            "method": method, "path": path, "status": resp.status_code,
            "stora_request_id": (body.get("meta") or {}).get("request_id")})
        return body

    def _send(self, method: str, url: str, params, json, headers, token) -> requests.Response:
        if self._limiter is not None:
            self._limiter.acquire(self._limiter_key)
        try:
            resp = self._session.request(
                method, url, params=params, json=json, timeout=self.timeout,
                headers={**headers, "Authorization": f"Bearer {token}"})
        except requests.Timeout as exc:
            metrics.stora_call("error")
            raise ApiUnavailable(f"{method} {url.split('?')[0]}: timed out") from exc
        except requests.RequestException as exc:
            metrics.stora_call("error")
            raise ApiUnavailable(f"{method} {url.split('?')[0]}: {type(exc).__name__}") from exc
        metrics.stora_call(resp.status_code)
        if resp.status_code == 429 and self._limiter is not None:
            # Every worker honours the cooldown, not only the one that was told.
            self._limiter.backoff(self._limiter_key, retry_after(resp) or 1.0)
        return resp

    def pinned(self) -> StoraClient:
        """A client for another thread: the same session, limiter and key, calling with
        the token this client would use now, and never asking the token source again.

        The token source reads (and on a 401 refreshes) through the caller's database
        session, which must stay on the caller's thread; a 401 on the copy raises
        ``Unauthorized`` instead, for the caller to repeat the call on this client.
        """
        return StoraClient(api_base=self.api_base, tokens=_PinnedToken(self._tokens.access_token()),
                           version=self.version, timeout=self.timeout, session=self._session,
                           limiter=self._limiter, limiter_key=self._limiter_key)

    # -- lists --------------------------------------------------------------------------
    def get_page(self, resource: str, *, page: int = 1, limit: int = MAX_PAGE_SIZE,
                 **params: Any) -> Page:
        """One page of ``GET /{version}/{resource}`` (envelope key = resource name)."""
        body = self.request("GET", resource, params={"page": page, "limit": limit, **params})
        key = resource.rsplit("/", 1)[-1]
        items = body.get(key)
        meta = body.get("meta") or {}
        if not isinstance(items, list):
            raise ApiUnavailable(f"GET {resource}: envelope has no {key!r} list")
        return Page(items=items, pagination=meta.get("pagination") or {}, meta=meta)

    def iter_pages(self, resource: str, *, limit: int = MAX_PAGE_SIZE,
                   start_page: int = 1, **params: Any) -> Iterator[Page]:
        """Follow ``meta.pagination.next`` until it is null."""
        page_no: int | None = start_page
        while page_no is not None:
            page = self.get_page(resource, page=page_no, limit=limit, **params)
            yield page
            nxt = page.next_page
            page_no = nxt if nxt is not None and nxt > page_no else None

    def list_sites(self) -> list[dict[str, Any]]:
        return [site for page in self.iter_pages("sites") for site in page.items]


class _PinnedToken:
    """``TokenSource`` of a pinned client: one token, no replacement."""

    def __init__(self, token: str):
        self._token = token

    def access_token(self) -> str:
        return self._token

    def replace_rejected(self, rejected: str) -> str | None:
        return None
