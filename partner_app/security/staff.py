"""Staff accounts: argon2id passwords, sign-in throttling, TOTP, sessions, administration.

Services here take explicit arguments (the client address, the vault, the clock, the
session mapping) and never read the request; views pass them in and commit.

Sign-in is two steps when the account has a second factor: the password, then a TOTP
code. Failures of either step count towards the same sliding windows, per account and
per client address, kept in Redis so every web process shares them.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyotp
import redis as redis_lib
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from flask import Flask
from sqlalchemy import func, or_, select, update

from partner_app import audit
from partner_app.db import db
from partner_app.extensions import login_manager
from partner_app.security.models import StaffUser
from partner_app.security.vault import PURPOSE_STAFF_TOTP, Vault, VaultError

log = logging.getLogger(__name__)

_hasher = PasswordHasher()

TOTP_ISSUER = "Stora partner platform"
TOTP_DIGITS = 6
TOTP_INTERVAL = 30
#: Codes one step either side of now are accepted (clock drift, typing time).
TOTP_WINDOW = 1
#: How long a correct password waits for its second factor.
SECOND_FACTOR_TTL = 300


@functools.cache
def _dummy_hash() -> str:
    """Verified when the e-mail is unknown, so both paths take the same time. Made on
    first sign-in, not at import: argon2 takes 64 MiB, which every worker would keep."""
    return _hasher.hash("not-a-real-password")


class StaffError(Exception):
    """Bad input to a staff-account operation; the message is safe to show."""


def normalise_email(email: str) -> str:
    return email.strip().lower()


ROLES = ("admin", "viewer")


def create_staff(email: str, password: str, *, role: str = "viewer", actor: str,
                 by_staff_id: int | None = None) -> StaffUser:
    """Add a staff account (flush only). Raises StaffError on bad input or a duplicate."""
    if role not in ROLES:
        raise StaffError(f"role must be one of {', '.join(ROLES)}")
    email = normalise_email(email)
    if "@" not in email or len(email) > 254:
        raise StaffError("a valid e-mail address is required")
    if len(password) < 12:
        raise StaffError("the password must be at least 12 characters")
    if db.session.scalar(select(func.count()).where(StaffUser.email == email)):
        raise StaffError(f"{email} already has an account")
    user = StaffUser(email=email, password_hash=_hasher.hash(password), role=role)
    db.session.add(user)
    db.session.flush()
    audit.record("staff.created", actor_type="staff" if actor != "cli" else "system",
                 actor=actor, staff_id=user.id, email=email, role=role,
                 **({"by_staff_id": by_staff_id} if by_staff_id is not None else {}))
    return user


def authenticate(email: str, password: str) -> StaffUser | None:
    """The active staff user with these credentials, or None (constant-ish time).

    Re-hashes the password when the stored hash uses weaker parameters than today's.
    """
    user = db.session.scalars(
        select(StaffUser).where(StaffUser.email == normalise_email(email))).one_or_none()
    try:
        _hasher.verify(user.password_hash if user else _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or not user.active:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    return user


# -- throttling ------------------------------------------------------------------------------
# One atomic script per attempt: drop failures older than the window, optionally add this
# one, and report how long until each key is back under its limit. KEYS: the account key,
# then the address key (if any). ARGV: now, window, then one limit per key, mode
# ("check" | "fail"), a unique member.
_THROTTLE_SCRIPT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local mode = ARGV[#KEYS + 3]
local member = ARGV[#KEYS + 4]
local wait = 0
local tripped = 0
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[2 + i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if mode == 'fail' then
    redis.call('ZADD', key, now, member)
    redis.call('PEXPIRE', key, math.ceil(window * 1000))
  end
  local count = redis.call('ZCARD', key)
  if mode == 'fail' and count == limit then
    tripped = 1
  end
  if count >= limit then
    local nth = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
    local until_free = tonumber(nth[2]) + window - now
    if until_free > wait then
      wait = until_free
    end
  end
end
return {tostring(wait), tripped}
"""


@dataclass(frozen=True)
class ThrottleState:
    retry_after: float  # seconds until another attempt is allowed; 0: allowed now
    tripped: bool = False  # this failure is the one that reached a limit


class LoginThrottle:
    """Failed sign-ins in a sliding window, per account and per client address.

    ``max_per_account`` failures for one e-mail address, or ``max_per_ip`` from one
    address, within ``window`` seconds block further attempts until the oldest of them
    leaves the window. A success clears the account's failures (not the address's).
    If Redis cannot be reached the attempt is allowed and the outage logged: argon2 still
    makes guessing slow, and locking every staff member out of the dashboard during a
    Redis outage would hide the outage itself.
    """

    PREFIX = "staff:login:"

    def __init__(self, redis: redis_lib.Redis, *, window: int, max_per_account: int,
                 max_per_ip: int):
        self._redis = redis
        self._script = redis.register_script(_THROTTLE_SCRIPT)
        self.window = window
        self.max_per_account = max_per_account
        self.max_per_ip = max_per_ip

    def _account_key(self, email: str) -> str:
        digest = hashlib.sha256(normalise_email(email).encode()).hexdigest()[:32]
        return f"{self.PREFIX}account:{digest}"

    def _keys(self, email: str, ip: str | None) -> tuple[list[str], list[int]]:
        keys, limits = [self._account_key(email)], [self.max_per_account]
        if ip:
            keys.append(f"{self.PREFIX}ip:{ip}")
            limits.append(self.max_per_ip)
        return keys, limits

    def _run(self, mode: str, email: str, ip: str | None, now: float | None) -> ThrottleState:
        keys, limits = self._keys(email, ip)
        now = time.time() if now is None else now
        try:
            wait, tripped = self._script(keys=keys, args=[
                repr(now), self.window, *limits, mode, f"{now!r}-{secrets.token_hex(4)}"])
        except redis_lib.RedisError:
            log.error("staff.login_throttle_unavailable", exc_info=True)
            return ThrottleState(0.0)
        return ThrottleState(max(0.0, float(wait)), bool(tripped))

    def check(self, email: str, ip: str | None, *, now: float | None = None) -> ThrottleState:
        """Whether an attempt for this account from this address may proceed."""
        return self._run("check", email, ip, now)

    def failed(self, email: str, ip: str | None, *, now: float | None = None) -> ThrottleState:
        """Count a failed attempt; ``tripped`` says this one reached a limit."""
        return self._run("fail", email, ip, now)

    def succeeded(self, email: str) -> None:
        try:
            self._redis.delete(self._account_key(email))
        except redis_lib.RedisError:
            log.error("staff.login_throttle_unavailable", exc_info=True)

    @classmethod
    def from_settings(cls, redis: redis_lib.Redis, settings) -> LoginThrottle:
        return cls(redis, window=settings.staff_login_window,
                   max_per_account=settings.staff_login_max_per_account,
                   max_per_ip=settings.staff_login_max_per_ip)


# -- signing in ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SignIn:
    """The outcome of one sign-in step.

    ``outcome``: ``signed_in``, ``second_factor`` (password right, a TOTP code is due),
    ``invalid`` or ``throttled`` (``retry_after`` seconds).
    """

    outcome: str
    user: StaffUser | None = None
    retry_after: int = 0


def _throttled(state: ThrottleState) -> SignIn:
    return SignIn("throttled", retry_after=max(1, int(state.retry_after + 0.999)))


def _record_failure(email: str, ip: str | None, reason: str, throttle: LoginThrottle,
                    now: float | None) -> SignIn:
    state = throttle.failed(email, ip, now=now)
    user_id = db.session.scalar(select(StaffUser.id).where(
        StaffUser.email == normalise_email(email)))
    audit.record("staff.login_failed", actor_type="staff", actor=normalise_email(email)[:200],
                 reason=reason, ip=ip, **({"staff_id": user_id} if user_id else {}))
    if state.tripped:
        audit.record("staff.login_throttled", actor_type="system", actor="login-throttle",
                     email=normalise_email(email)[:200], ip=ip,
                     window_seconds=throttle.window)
        log.warning("staff.login_throttled", extra={"ip": ip})
    return SignIn("invalid")


def _signed_in(user: StaffUser, ip: str | None, throttle: LoginThrottle, *,
               second_factor: bool) -> SignIn:
    throttle.succeeded(user.email)
    user.last_login_at = datetime.now(UTC)
    audit.record("staff.login", actor_type="staff", actor=user.email, staff_id=user.id, ip=ip,
                 second_factor=second_factor)
    return SignIn("signed_in", user)


def sign_in_with_password(email: str, password: str, *, ip: str | None,
                          throttle: LoginThrottle, now: float | None = None) -> SignIn:
    """First step. Flushes audit rows and the last-login time; the caller commits.

    A throttled attempt is refused before the password is checked, so a blocked guesser
    learns nothing, not even whether the password was right.
    """
    state = throttle.check(email, ip, now=now)
    if state.retry_after > 0:
        log.info("staff.login_refused_throttled", extra={"ip": ip})
        return _throttled(state)
    user = authenticate(email, password)
    if user is None:
        return _record_failure(email, ip, "credentials", throttle, now)
    if user.totp_enabled:
        return SignIn("second_factor", user)
    return _signed_in(user, ip, throttle, second_factor=False)


def sign_in_with_code(user_id: int, code: str, *, ip: str | None, throttle: LoginThrottle,
                      vault: Vault, now: float | None = None) -> SignIn:
    """Second step for an account with TOTP; the password was right moments ago."""
    user = db.session.get(StaffUser, user_id)
    if user is None or not user.active or not user.totp_enabled:
        return SignIn("invalid")
    state = throttle.check(user.email, ip, now=now)
    if state.retry_after > 0:
        return _throttled(state)
    try:
        verified = verify_totp(user, code, vault=vault, now=now)
    except VaultError:
        # Sealed under a key no longer in the keyring: only an admin's reset helps.
        log.error("staff.totp_secret_unreadable", extra={"staff_id": user.id})
        verified = False
    if not verified:
        return _record_failure(user.email, ip, "totp", throttle, now)
    return _signed_in(user, ip, throttle, second_factor=True)


# -- TOTP ------------------------------------------------------------------------------------
def _totp_context(user_id: int) -> str:
    return f"staff_users:{user_id}:totp_secret_ct"


def _totp_secret(user: StaffUser, vault: Vault) -> str:
    return vault.unseal(user.totp_secret_ct, purpose=PURPOSE_STAFF_TOTP,
                        context=_totp_context(user.id))


def _matching_step(secret: str, code: str, now: float) -> int | None:
    """The time step (±TOTP_WINDOW around ``now``) whose code is ``code``, if any."""
    code = code.strip().replace(" ", "")
    if len(code) != TOTP_DIGITS or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_INTERVAL)
    current = int(now) // TOTP_INTERVAL
    match = None
    for step in range(current - TOTP_WINDOW, current + TOTP_WINDOW + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):  # check all: constant work
            match = step
    return match


def _claim_step(user: StaffUser, step: int) -> bool:
    """Record ``step`` as used unless it (or a later one) already was: atomic, so two
    requests racing with one code cannot both win."""
    result = db.session.execute(
        update(StaffUser)
        .where(StaffUser.id == user.id,
               or_(StaffUser.totp_last_step.is_(None), StaffUser.totp_last_step < step))
        .values(totp_last_step=step)
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:
        return False
    user.totp_last_step = step
    return True


def begin_totp_enrolment(user: StaffUser, *, vault: Vault) -> str:
    """Give the account a new, not yet active TOTP secret; returns its otpauth:// URI.

    The secret is sealed by the vault before it is stored; an active second factor is
    replaced only once the new one is confirmed.
    """
    if user.totp_enabled:
        raise StaffError("a second factor is already active; an admin can reset it")
    secret = pyotp.random_base32()
    user.totp_secret_ct = vault.seal(secret, purpose=PURPOSE_STAFF_TOTP,
                                     context=_totp_context(user.id))
    user.totp_enabled_at = None
    return totp_uri(user, vault=vault)


def totp_uri(user: StaffUser, *, vault: Vault) -> str | None:
    """The otpauth:// URI of the account's secret (enrolling), for an authenticator app."""
    if user.totp_secret_ct is None:
        return None
    return pyotp.TOTP(_totp_secret(user, vault), digits=TOTP_DIGITS,
                      interval=TOTP_INTERVAL).provisioning_uri(name=user.email,
                                                                issuer_name=TOTP_ISSUER)


def confirm_totp_enrolment(user: StaffUser, code: str, *, vault: Vault,
                           now: float | None = None) -> bool:
    """Activate the pending secret if ``code`` comes from it. Flushes; the caller commits."""
    if user.totp_secret_ct is None or user.totp_enabled:
        raise StaffError("there is no enrolment in progress")
    now = time.time() if now is None else now
    step = _matching_step(_totp_secret(user, vault), code, now)
    if step is None or not _claim_step(user, step):
        return False
    user.totp_enabled_at = datetime.fromtimestamp(now, UTC)
    audit.record("staff.totp_enabled", actor_type="staff", actor=user.email, staff_id=user.id)
    return True


def verify_totp(user: StaffUser, code: str, *, vault: Vault, now: float | None = None) -> bool:
    """True once per code: a code within the window, newer than the last one accepted.

    Re-seals the secret under the active key when it was sealed under an older one, so a
    keyring rotation reaches TOTP secrets as their owners sign in.
    """
    if not user.totp_enabled:
        return False
    now = time.time() if now is None else now
    secret = _totp_secret(user, vault)
    step = _matching_step(secret, code, now)
    if step is None or not _claim_step(user, step):
        return False
    if Vault.kid_of(user.totp_secret_ct) != vault.keyring.active_kid:
        user.totp_secret_ct = vault.seal(secret, purpose=PURPOSE_STAFF_TOTP,
                                         context=_totp_context(user.id))
    return True


# -- sessions --------------------------------------------------------------------------------
SESSION_STARTED = "staff_session_started"
SESSION_SEEN = "staff_session_seen"
PENDING_USER = "staff_pending_user"
PENDING_AT = "staff_pending_at"


def start_session(session: MutableMapping[str, Any], *, now: float) -> None:
    """Stamp a freshly signed-in session (the caller cleared it first: no fixation)."""
    session[SESSION_STARTED] = int(now)
    session[SESSION_SEEN] = int(now)


def session_expired(session: MutableMapping[str, Any], *, now: float, idle: int,
                    absolute: int) -> bool:
    """True if the session is older than ``absolute`` seconds or idle for ``idle``;
    otherwise marks it seen now. A session without stamps counts as expired."""
    started, seen = session.get(SESSION_STARTED), session.get(SESSION_SEEN)
    if not isinstance(started, int) or not isinstance(seen, int):
        return True
    if now - started > absolute or now - seen > idle:
        return True
    if int(now) - seen >= 15:  # avoid re-issuing the cookie on every request
        session[SESSION_SEEN] = int(now)
    return False


def await_second_factor(session: MutableMapping[str, Any], user: StaffUser, *,
                        now: float) -> None:
    session[PENDING_USER] = user.id
    session[PENDING_AT] = int(now)


def pending_second_factor(session: MutableMapping[str, Any], *, now: float) -> int | None:
    """The id of the account whose password was right and whose code is due, if recent."""
    user_id, at = session.get(PENDING_USER), session.get(PENDING_AT)
    if not isinstance(user_id, int) or not isinstance(at, int) or now - at > SECOND_FACTOR_TTL:
        return None
    return user_id


# -- administration --------------------------------------------------------------------------
def set_active(target: StaffUser, active: bool, *, actor: StaffUser) -> None:
    """Deactivate or reactivate an account (not one's own). A deactivated member is
    signed out on their next request. Flushes; the caller commits."""
    if target.id == actor.id:
        raise StaffError("you cannot change your own account's access")
    if target.active == active:
        return
    target.active = active
    audit.record("staff.reactivated" if active else "staff.deactivated", actor_type="staff",
                 actor=actor.email, by_staff_id=actor.id, staff_id=target.id,
                 email=target.email)


def reset_totp(target: StaffUser, *, actor: StaffUser) -> None:
    """Remove an account's second factor (a lost phone); they may enrol again."""
    target.totp_secret_ct = None
    target.totp_enabled_at = None
    target.totp_last_step = None
    audit.record("staff.totp_reset", actor_type="staff", actor=actor.email,
                 by_staff_id=actor.id, staff_id=target.id, email=target.email)


def init_app(app: Flask) -> None:
    settings = app.extensions["settings"]
    # The cookie itself dies with the absolute limit; the idle limit is checked per request.
    app.config["PERMANENT_SESSION_LIFETIME"] = settings.staff_session_max
    login_manager.login_message = "Please sign in to see the staff dashboard."
    login_manager.login_message_category = "info"

    @login_manager.user_loader
    def load_user(user_id: str) -> StaffUser | None:
        try:
            user = db.session.get(StaffUser, int(user_id))
        except ValueError:
            return None
        return user if user is not None and user.active else None
