"""The secret canary (T-16): run the suite with marked secrets, then search for them.

With ``SECRET_CANARY=1`` in the environment:

* the sandbox issues every code, access token, refresh token and webhook secret with
  :data:`MARKER` in it (``stora_sandbox --canary``), and the partner's own client secret
  and session key carry it too;
* every process of the run logs at DEBUG with Authlib at DEBUG (the logger that prints
  PKCE verifiers and tokens when misused) and appends to one log file; gunicorn's
  access log is on, as always;
* before any table is truncated, before the test Redis db is flushed, after every test
  that used the backend and once more before the schema is dropped, every row of every
  table and every Redis key and value (RQ job hashes with their ``exc_info``, queues,
  registries, gates) is searched for the marker;
* at the end, every ``*.log`` file the run wrote is searched too, and any hit fails the
  session, naming where the marker was found (never the value around it).

Ciphertext columns are searched like any other: a vault ciphertext is random base64, so
the marker appearing in one means a value was stored in the clear.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

#: The fixed string every secret of a canary run carries. Letters and digits only, so
#: it survives URL encoding unchanged and stays visible inside tokens.
MARKER = "CANARYq7Zr3W"
ENV_SWITCH = "SECRET_CANARY"
LOG_DIR_ENV = "SECRET_CANARY_LOG_DIR"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "").strip().lower() in {"1", "true", "yes", "on"}


def secret(plain: str) -> str:
    """``plain``, marked when the canary runs (for secrets the tests themselves choose)."""
    return f"{MARKER}_{plain}" if enabled() else plain


def _encodings(marker: bytes) -> list[bytes]:
    """The marker and the parts of it that survive base64 or hex encoding of any string
    containing it (three alignments, standard and URL-safe alphabets)."""
    needles = [marker, marker.hex().encode()]
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + marker)
        start = -(-8 * offset // 6)
        end = 8 * (offset + len(marker)) // 6
        core = encoded[start:end]
        needles += [core, core.replace(b"+", b"-").replace(b"/", b"_")]
    return list(dict.fromkeys(needles))


NEEDLES = _encodings(MARKER.encode())


def found_in(data: bytes | str) -> bool:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    return any(needle in data for needle in NEEDLES)


def masked(text: str) -> str:
    """``text`` fit to print in a report: the marker and anything after it hidden."""
    for needle in NEEDLES:
        index = text.find(needle.decode())
        if index >= 0:
            text = text[:index] + "<canary…>"
    return text[:120]


@dataclass(frozen=True)
class Hit:
    where: str  # "log", "redis" or "database"
    detail: str  # file:line, key[field], table.column — never the value

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"


HITS: list[Hit] = []
_SEEN: set[Hit] = set()


def _record(where: str, detail: str) -> None:
    hit = Hit(where, masked(detail))
    if hit not in _SEEN:
        _SEEN.add(hit)
        HITS.append(hit)


# -- set-up ----------------------------------------------------------------------------


def configure(config: pytest.Config) -> None:
    """Make every process this run starts (and this one) log loudly to a known place and
    the sandbox issue marked secrets; inherited through ``os.environ``."""
    chosen = os.environ.get(LOG_DIR_ENV)
    log_dir = Path(chosen or tempfile.mkdtemp(prefix="secret-canary-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    config.stash[_OWN_LOG_DIR] = not chosen
    os.environ[ENV_SWITCH] = "1"
    os.environ[LOG_DIR_ENV] = str(log_dir)
    os.environ.update(env())
    config.stash[_LOG_DIR] = log_dir


_LOG_DIR = pytest.StashKey[Path]()
_OWN_LOG_DIR = pytest.StashKey[bool]()


def env() -> dict[str, str]:
    """Settings every partner-app process of a canary run gets."""
    if not enabled():
        return {}
    return {
        "STORA_SANDBOX_CANARY": MARKER,
        "LOG_LEVEL": "DEBUG",
        "LOG_LEVELS": "authlib=DEBUG",
        "LOG_FILE": str(Path(os.environ[LOG_DIR_ENV]) / "processes.log"),
    }


# -- searching -------------------------------------------------------------------------


def scan_database(conn) -> None:
    """Search every column of every row of every table the connection can see."""
    import sqlalchemy as sa

    names = tuple(sorted(sa.inspect(conn).get_table_names()))
    key = (str(conn.engine.url), names)
    if key not in _REFLECTED:  # reflecting every table before every truncate is slow
        metadata = sa.MetaData()
        metadata.reflect(conn, only=list(names))
        _REFLECTED[key] = [metadata.tables[name] for name in names]
    for table in _REFLECTED[key]:
        for row in conn.execute(sa.select(table)):
            for column, value in row._mapping.items():
                if value is None:
                    continue
                raw = value if isinstance(value, bytes | bytearray | memoryview) else str(value)
                if found_in(bytes(raw) if not isinstance(raw, str) else raw):
                    _record("database", f"{table.name}.{column}")


_REFLECTED: dict[tuple[str, tuple[str, ...]], list] = {}


def scan_redis(conn) -> None:
    """Search every key and value (strings, hashes, lists, sets, sorted sets, streams)."""
    for key in conn.scan_iter(count=500):
        name = key.decode("utf-8", "replace")
        if found_in(key):
            _record("redis", f"key {name}")
        kind = conn.type(key)
        values: list[tuple[str, bytes]] = []
        if kind == b"string":
            values = [("", conn.get(key) or b"")]
        elif kind == b"hash":
            values = [(f"[{f.decode('utf-8', 'replace')}]", v)
                      for f, v in conn.hgetall(key).items()]
        elif kind == b"list":
            values = [("[]", v) for v in conn.lrange(key, 0, -1)]
        elif kind == b"set":
            values = [("{}", v) for v in conn.smembers(key)]
        elif kind == b"zset":
            values = [("{}", v) for v, _ in conn.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            values = [(f"[{f.decode('utf-8', 'replace')}]", v)
                      for _, fields in conn.xrange(key) for f, v in fields.items()]
        for suffix, value in values:
            if found_in(value):
                _record("redis", f"{name}{suffix}")


def scan_redis_url(url: str | None) -> None:
    """:func:`scan_redis` on the Redis at ``url``, if one answers there."""
    import redis

    if not url:
        return
    conn = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        scan_redis(conn)
    except (redis.ConnectionError, FileNotFoundError):
        pass  # nothing was started there, so nothing was stored
    finally:
        conn.close()


def scan_logs(*roots: Path) -> int:
    """Search every ``*.log`` file under ``roots``; returns how many files were read."""
    files = 0
    for root in roots:
        if not root.exists():
            continue
        for path in sorted(root.rglob("*.log")):
            files += 1
            with path.open("rb") as handle:
                for number, line in enumerate(handle, 1):
                    if found_in(line):
                        _record("log", f"{path}:{number}")
    return files


def finish(session: pytest.Session) -> None:
    """Search the logs, report every hit and fail the session if there is one."""
    config = session.config
    roots = [config.stash[_LOG_DIR]]
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is not None:
        roots.append(factory.getbasetemp())
    files = scan_logs(*roots)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"secret canary: {len(HITS)} hit(s) of the marker in {files} log file(s), "
             "every scanned table and every scanned Redis key"]
    lines += [f"  {hit}" for hit in HITS]
    if HITS:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        lines.append(f"secret canary: the shared log is kept in {roots[0]}")
    elif config.stash[_OWN_LOG_DIR]:
        shutil.rmtree(roots[0], ignore_errors=True)
    for line in lines:
        if reporter is not None:
            reporter.write_line(line, red=bool(HITS), green=not HITS)
        else:
            print(line)
