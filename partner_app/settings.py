"""Typed settings, parsed once from the environment.

`Settings.from_env(environ)` validates every variable and raises `ConfigError` naming
*all* missing or malformed ones at once, so an operator fixing a deployment sees the
whole list on the first failed start.

Modes (``APP_ENV``):

* ``production`` (default): every secret must be provided; nothing is generated.
* ``demo``: the embedded defaults (SQLite file, embedded Redis) and throwaway secrets.
* ``test``: like demo, for the test-suite.

Secrets never have defaults in production. In demo and test modes missing secrets are
generated per process, which is only coherent when a single launcher generates them
once and hands them to every process (``partner-app demo`` does exactly that).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from partner_app.envparse import number
from partner_app.lifecycle.settings import RetentionSettings
from partner_app.security.vault import generate_key_entry
from partner_app.stora.ratelimit import RateLimitSettings

MODES = ("production", "demo", "test")
TOKEN_AUTH_METHODS = ("json_body", "form_body", "basic")
DEFAULT_API_BASE = "https://public-api.stora.co"
DEFAULT_SCOPES = (
    "public.site:read",
    "public.contact:read",
    "public.order:read",
    "public.webhook_endpoint:read",
    "public.webhook_endpoint:write",
    "public.timeline_source:read",
    "public.timeline_template:read",
    "public.timeline_event:write",
)
_KID_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_SCOPE_RE = re.compile(r"^[a-z_.]+:(read|write)$")
_EVENT_TYPE_RE = re.compile(r"^[a-z_]+\.[a-z_.]+$")


class ConfigError(Exception):
    """The environment does not describe a startable application.

    ``problems`` lists one human-readable line per bad or missing variable.
    """

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


def parse_encryption_keys(value: str) -> tuple[tuple[str, bytes], ...]:
    """Parse ``kid:base64key,kid:base64key``; the first entry is the active key.

    Raises ValueError with a message that never contains key material.
    """
    entries: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    for position, item in enumerate(value.split(","), start=1):
        item = item.strip()
        if not item:
            continue
        kid, sep, encoded = item.partition(":")
        if not sep or not _KID_RE.match(kid):
            raise ValueError(f"entry {position} is not 'kid:base64key' "
                             "(kid: 1-32 of A-Z a-z 0-9 _ -)")
        if kid in seen:
            raise ValueError(f"key id {kid!r} appears twice")
        try:
            # Accept standard and URL-safe alphabets, with or without padding.
            normalised = encoded.strip().translate(str.maketrans("-_", "+/"))
            key = base64.b64decode(normalised + "=" * (-len(normalised) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"key {kid!r} is not valid base64") from None
        if len(key) != 32:
            raise ValueError(f"key {kid!r} must decode to 32 bytes, got {len(key)}")
        seen.add(kid)
        entries.append((kid, key))
    if not entries:
        raise ValueError("no keys given")
    return tuple(entries)


@dataclass(frozen=True)
class Settings:
    """Everything the app, the workers and the CLI need to know about their environment."""

    mode: str
    database_url: str
    redis_url: str | None  # None: start the embedded Redis (demo/test only)
    secret_key: str = field(repr=False)
    encryption_keys: tuple[tuple[str, bytes], ...] = field(repr=False)
    stora_client_id: str
    stora_client_secret: str = field(repr=False)
    stora_api_base: str
    stora_authorize_url: str
    stora_scopes: tuple[str, ...]
    public_base_url: str
    stora_token_auth: str = "json_body"  # noqa: S105 (a method name)
    instance_path: str = "instance"
    install_state_ttl: int = 600
    install_link_ttl: int = 3600
    http_connect_timeout: float = 3.0
    http_read_timeout: float = 10.0
    log_level: str = "INFO"
    log_format: str = "json"  # json | text
    metrics_token: str | None = field(default=None, repr=False)
    log_levels: tuple[tuple[str, str], ...] = ()  # per-logger overrides (LOG_LEVELS)
    log_file: str | None = None  # also append log lines here (LOG_FILE)
    rate_limit: RateLimitSettings = field(default_factory=RateLimitSettings)
    webhook_event_types: tuple[str, ...] = ("order.created",)
    webhook_tolerance: int = 300
    webhook_max_body: int = 1024 * 1024
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    staff_session_idle: int = 1800
    staff_session_max: int = 12 * 3600
    staff_login_window: int = 900
    staff_login_max_per_account: int = 5
    staff_login_max_per_ip: int = 20
    generated_secrets: tuple[str, ...] = ()

    # -- derived ---------------------------------------------------------------
    @property
    def redirect_uri(self) -> str:
        """The single callback URL registered with Stora; identical in both OAuth legs."""
        return self.public_base_url.rstrip("/") + "/oauth/callback"

    @property
    def token_url(self) -> str:
        return self.stora_api_base.rstrip("/") + "/oauth2/token"

    @property
    def token_info_url(self) -> str:
        return self.stora_api_base.rstrip("/") + "/oauth2/token/info"

    @property
    def revoke_url(self) -> str:
        return self.stora_api_base.rstrip("/") + "/oauth2/revoke"

    @property
    def is_production(self) -> bool:
        return self.mode == "production"

    @property
    def secure_cookies(self) -> bool:
        return self.public_base_url.startswith("https://")

    def replace(self, **changes: object) -> Settings:
        return replace(self, **changes)

    # -- construction ----------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Parse and validate the environment. Raises ConfigError listing every problem."""
        env = dict(os.environ if environ is None else environ)
        problems: list[str] = []
        generated: list[str] = []

        mode = env.get("APP_ENV", "production").strip().lower()
        if mode not in MODES:
            problems.append(f"APP_ENV must be one of {', '.join(MODES)}, got {mode!r}")
            mode = "production"
        lenient = mode != "production"
        instance_path = env.get("INSTANCE_PATH", "").strip() or str(Path.cwd() / "instance")
        if mode == "demo":
            # `partner-app demo` keeps its throwaway secrets here; every command run in
            # demo mode against the same instance folder shares them.
            for key, value in read_env_file(Path(instance_path) / "demo.env").items():
                env.setdefault(key, value)

        def required(name: str, make_throwaway=None) -> str:
            value = env.get(name, "").strip()
            if value:
                return value
            if lenient and make_throwaway is not None:
                generated.append(name)
                return make_throwaway()
            problems.append(f"{name} is required" + ("" if lenient else " in production"))
            return ""

        database_url = env.get("DATABASE_URL", "").strip()
        if not database_url:
            if lenient:
                database_url = f"sqlite:///{Path(instance_path).resolve() / 'partner.db'}"
            else:
                problems.append("DATABASE_URL is required in production (postgresql://…)")
        elif not database_url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:",
                                          "postgres:")):
            problems.append("DATABASE_URL must be a sqlite:// or postgresql:// URL")
        if database_url.startswith("postgres:"):
            database_url = "postgresql+psycopg:" + database_url[len("postgres:"):]
        elif database_url.startswith("postgresql:"):
            database_url = "postgresql+psycopg:" + database_url[len("postgresql:"):]

        redis_url: str | None = env.get("REDIS_URL", "").strip() or None
        if redis_url is None and not lenient:
            problems.append("REDIS_URL is required in production "
                            "(the embedded Redis is for demo/test)")
        elif redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            problems.append("REDIS_URL must be a redis://, rediss:// or unix:// URL")

        secret_key = required("SECRET_KEY", lambda: secrets.token_urlsafe(32))
        if secret_key and len(secret_key) < 16:
            problems.append("SECRET_KEY must be at least 16 characters")

        raw_keys = required("ENCRYPTION_KEYS", lambda: generate_key_entry("demo"))
        encryption_keys: tuple[tuple[str, bytes], ...] = ()
        if raw_keys:
            try:
                encryption_keys = parse_encryption_keys(raw_keys)
            except ValueError as exc:
                problems.append(f"ENCRYPTION_KEYS: {exc}")

        client_id = required("STORA_CLIENT_ID", lambda: "sandbox-client")
        client_secret = required("STORA_CLIENT_SECRET", lambda: secrets.token_urlsafe(24))

        api_base = env.get("STORA_API_BASE", "").strip() or DEFAULT_API_BASE
        if not _is_http_url(api_base):
            problems.append("STORA_API_BASE must be an http(s) URL")
        elif not lenient and not api_base.startswith("https://"):
            problems.append("STORA_API_BASE must use https:// in production")
        authorize_url = (env.get("STORA_AUTHORIZE_URL", "").strip()
                         or api_base.rstrip("/") + "/oauth2/authorize")
        if not _is_http_url(authorize_url):
            problems.append("STORA_AUTHORIZE_URL must be an http(s) URL")

        scopes_raw = env.get("STORA_SCOPES", "").strip()
        scopes = tuple(scopes_raw.replace(",", " ").split()) if scopes_raw else DEFAULT_SCOPES
        bad_scopes = [s for s in scopes if not _SCOPE_RE.match(s)]
        if bad_scopes:
            problems.append(f"STORA_SCOPES has malformed scopes: {', '.join(bad_scopes)}")

        public_base_url = required("PUBLIC_BASE_URL", lambda: "http://127.0.0.1:5000")
        if public_base_url and not _is_http_url(public_base_url):
            problems.append("PUBLIC_BASE_URL must be an http(s) URL")
        elif public_base_url and not lenient and not public_base_url.startswith("https://"):
            problems.append("PUBLIC_BASE_URL must use https:// in production")

        token_auth = env.get("STORA_TOKEN_AUTH", "json_body").strip()
        if token_auth not in TOKEN_AUTH_METHODS:
            problems.append(f"STORA_TOKEN_AUTH must be one of {', '.join(TOKEN_AUTH_METHODS)}")

        install_state_ttl = number(env, "INSTALL_STATE_TTL", 600, problems, low=30, high=3600)
        install_link_ttl = number(env, "INSTALL_LINK_TTL", 3600, problems, low=60, high=30 * 86400)
        log_level = env.get("LOG_LEVEL", "INFO").strip().upper()
        if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            problems.append("LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
        log_format = env.get("LOG_FORMAT", "").strip().lower() or ("text" if lenient else "json")
        if log_format not in ("json", "text"):
            problems.append("LOG_FORMAT must be json or text")
        metrics_token = env.get("METRICS_TOKEN", "").strip() or None
        if metrics_token is not None and len(metrics_token) < 16:
            problems.append("METRICS_TOKEN must be at least 16 characters")
        log_levels = []
        for item in env.get("LOG_LEVELS", "").replace(",", " ").split():
            name, _, level = item.partition("=")
            if not name or level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
                problems.append(f"LOG_LEVELS entries are logger=LEVEL, got {item!r}")
            else:
                log_levels.append((name, level.upper()))
        log_file = env.get("LOG_FILE", "").strip() or None

        raw_types = env.get("WEBHOOK_EVENT_TYPES", "").replace(",", " ").split()
        webhook_event_types = tuple(dict.fromkeys(raw_types)) or ("order.created",)
        bad_types = [t for t in webhook_event_types if not _EVENT_TYPE_RE.match(t)]
        if bad_types:
            problems.append(f"WEBHOOK_EVENT_TYPES has malformed types: {', '.join(bad_types)}")
        webhook_tolerance = number(env, "WEBHOOK_TOLERANCE", 300, problems, low=0, high=7 * 86400)
        webhook_max_body = number(env, "WEBHOOK_MAX_BODY", 1024 * 1024, problems,
                                low=1024, high=32 * 1024 * 1024)

        staff_session_idle = number(env, "STAFF_SESSION_IDLE", 1800, problems,
                                    low=60, high=7 * 86400)
        staff_session_max = number(env, "STAFF_SESSION_MAX", 12 * 3600, problems,
                                   low=300, high=30 * 86400)
        staff_login_window = number(env, "STAFF_LOGIN_WINDOW", 900, problems,
                                    low=10, high=86400)
        staff_login_max_per_account = number(env, "STAFF_LOGIN_MAX_PER_ACCOUNT", 5, problems,
                                             low=1, high=1000)
        staff_login_max_per_ip = number(env, "STAFF_LOGIN_MAX_PER_IP", 20, problems,
                                        low=1, high=100000)

        rate_limit, rate_problems = RateLimitSettings.parse(env)
        problems += rate_problems
        retention, retention_problems = RetentionSettings.parse(env)
        problems += retention_problems

        if problems:
            raise ConfigError(problems)
        return cls(
            mode=mode,
            database_url=database_url,
            redis_url=redis_url,
            secret_key=secret_key,
            encryption_keys=encryption_keys,
            stora_client_id=client_id,
            stora_client_secret=client_secret,
            stora_api_base=api_base.rstrip("/"),
            stora_authorize_url=authorize_url,
            stora_scopes=scopes,
            public_base_url=public_base_url.rstrip("/"),
            stora_token_auth=token_auth,
            instance_path=instance_path,
            install_state_ttl=install_state_ttl,
            install_link_ttl=install_link_ttl,
            log_level=log_level,
            log_format=log_format,
            metrics_token=metrics_token,
            log_levels=tuple(log_levels),
            log_file=log_file,
            rate_limit=rate_limit,
            webhook_event_types=webhook_event_types,
            webhook_tolerance=webhook_tolerance,
            webhook_max_body=webhook_max_body,
            retention=retention,
            staff_session_idle=staff_session_idle,
            staff_session_max=staff_session_max,
            staff_login_window=staff_login_window,
            staff_login_max_per_account=staff_login_max_per_account,
            staff_login_max_per_ip=staff_login_max_per_ip,
            generated_secrets=tuple(generated),
        )


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of a file (``#`` comments allowed); {} if it does not exist."""
    values: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return values
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and not key.strip().startswith("#"):
            values[key.strip()] = value.strip()
    return values


def _is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)
