"""Typed errors for everything that crosses the wire to Stora.

``retryable`` tells a job whether trying again later can help. Messages carry status
codes, Stora error codes and request ids, never a token, code or secret.
"""

from __future__ import annotations


class StoraError(Exception):
    """Base class for failures talking to Stora."""

    retryable = False

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 request_id: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after


# -- OAuth endpoints ------------------------------------------------------------------
class OAuthError(StoraError):
    """The token, token-info or revoke endpoint refused or failed."""


class InvalidGrant(OAuthError):
    """The code or refresh token is invalid, expired, revoked or already used."""


class InvalidClient(OAuthError):
    """Our client credentials were rejected: a platform-wide incident, not a tenant's."""


class OAuthRequestRejected(OAuthError):
    """Any other 4xx OAuth error (invalid_request, unsupported_grant_type, invalid_scope…)."""


class OAuthUnavailable(OAuthError):
    """Timeout, connection failure, 5xx, 429 or an unreadable body: try again later.

    For a code exchange the outcome is unknown and the code must not be replayed.
    """

    retryable = True


class MalformedTokenResponse(OAuthUnavailable):
    """A 2xx token response that lacks what RFC 6749 §5.1 requires."""


# -- API ---------------------------------------------------------------------------------
class ApiError(StoraError):
    """A Stora API call failed."""


class ApiUnavailable(ApiError):
    """Timeout, connection failure or 5xx."""

    retryable = True


class RateLimited(ApiError):
    """429 too_many_requests; ``retry_after`` seconds, when Stora said."""

    retryable = True


class Unauthorized(ApiError):
    """401 invalid_token: the access token is expired or revoked."""


class Forbidden(ApiError):
    """403 forbidden: a scope is missing; only re-consent fixes it."""


class NotFound(ApiError):
    """404 resource_not_found / invalid_endpoint."""


class RequestRejected(ApiError):
    """Any other 4xx (400, 409, 422…): permanent for this request."""


class RateLimitWait(StoraError):
    """Our own limiter says the next call for this key may go out only after
    ``retry_after`` seconds: too long to wait in a worker, so re-schedule instead."""

    retryable = True
