"""``partner-app demo``: the whole platform on embedded defaults, in one command.

Starts the local Stora (seeded with three operators), the web app, one worker with its
scheduler and the cron scheduler (token refresh, syncs, webhook repair, sweepers), on a
SQLite file and the embedded Redis unless DATABASE_URL/REDIS_URL say otherwise.
Throwaway secrets are generated once into ``instance/demo.env`` (mode 0600,
git-ignored) so a restart can still decrypt what the last run stored.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import requests

from partner_app import embedded_redis
from partner_app.metrics import fresh_multiproc_dir
from partner_app.security.vault import generate_key_entry
from partner_app.settings import read_env_file

DEMO_CLIENT_ID = "demo-partner"
DEMO_STAFF_EMAIL = "staff@partner.example"


_SECRETS = {
    "SECRET_KEY": lambda: secrets.token_urlsafe(32),
    "ENCRYPTION_KEYS": lambda: generate_key_entry("demo1"),
    "STORA_CLIENT_SECRET": lambda: secrets.token_urlsafe(24),
    "DEMO_STAFF_PASSWORD": lambda: secrets.token_urlsafe(12),
}


def _demo_env(path: Path, current: dict[str, str]) -> dict[str, str]:
    """Secrets kept from the last run (made on the first), plus this run's settings,
    written back (0600) so ``APP_ENV=demo partner-app …`` commands share them."""
    values = read_env_file(path)
    for key, make in _SECRETS.items():
        values.setdefault(key, make())
    values.update(current)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("# Throwaway settings for `partner-app demo`. Never use in production.\n")
        handle.writelines(f"{k}={v}\n" for k, v in values.items())
    return values


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"{url} process exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise click.ClickException(f"{url} did not answer within {timeout:.0f}s")


def run_demo(*, web_port: int, sandbox_port: int, instance: Path) -> None:
    started = time.monotonic()
    for port in (web_port, sandbox_port):
        if not _port_free(port):
            raise click.ClickException(
                f"port {port} is in use; pass --web-port/--sandbox-port to pick others")
    instance = instance.resolve()
    public = f"http://127.0.0.1:{web_port}"
    stora = f"http://127.0.0.1:{sandbox_port}"
    settings_env = _demo_env(instance / "demo.env", {
        "DATABASE_URL": os.environ.get("DATABASE_URL") or f"sqlite:///{instance / 'partner.db'}",
        "REDIS_URL": os.environ.get("REDIS_URL") or embedded_redis.ensure_running(str(instance)),
        "STORA_CLIENT_ID": DEMO_CLIENT_ID,
        "STORA_API_BASE": stora,
        "PUBLIC_BASE_URL": public,
    })
    env = {
        **os.environ,
        **{k: v for k, v in settings_env.items() if k != "DEMO_STAFF_PASSWORD"},
        "APP_ENV": "demo",
        "INSTANCE_PATH": str(instance),
        "STORA_SANDBOX_CLIENT_SECRET": settings_env["STORA_CLIENT_SECRET"],
        "PROMETHEUS_MULTIPROC_DIR": fresh_multiproc_dir(instance / "metrics"),
    }
    cli = [sys.executable, "-m", "partner_app.cli"]
    subprocess.run([*cli, "db", "upgrade"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _ensure_staff(cli, env, settings_env["DEMO_STAFF_PASSWORD"])

    procs: list[tuple[str, subprocess.Popen]] = []

    def stop_all(*_: object) -> None:
        for _name, proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for _name, proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not os.environ.get("REDIS_URL"):
            embedded_redis.stop(str(instance))

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        procs.append(("stora_sandbox", subprocess.Popen(
            [sys.executable, "-m", "stora_sandbox", "--host", "127.0.0.1",
             "--port", str(sandbox_port), "--client-id", DEMO_CLIENT_ID,
             "--redirect-uri", f"{public}/oauth/callback", "--seed", "demo"], env=env)))
        procs.append(("web", subprocess.Popen(
            [*cli, "web", "--port", str(web_port), "--workers", "2"], env=env)))
        procs.append(("worker", subprocess.Popen([*cli, "worker", "--name",
                                                  f"demo-{os.getpid()}"], env=env)))
        procs.append(("cron", subprocess.Popen([*cli, "cron"], env=env)))
        _wait_http(f"{stora}/_sandbox/health", procs[0][1], 30)
        _wait_http(f"{public}/healthz", procs[1][1], 30)
        link = subprocess.run([*cli, "links", "create", "--ttl", "1d", "--note", "demo"],
                              env=env, check=True, capture_output=True, text=True).stdout.strip()
        elapsed = time.monotonic() - started
        click.echo("\n".join([
            "",
            f"ready in {elapsed:.1f}s",
            f"  install link (public):      {public}/install",
            f"  install link (single-use):  {link}",
            f"  staff dashboard:            {public}/staff/",
            f"  staff login:                {DEMO_STAFF_EMAIL} / "
            f"{settings_env['DEMO_STAFF_PASSWORD']}",
            f"  local Stora (sandbox):      {stora}  (admin API under /_sandbox/)",
            f"  data:                       {env['DATABASE_URL']}",
            "Press Ctrl-C to stop.",
            ""]))
        while True:
            for name, proc in procs:
                if proc.poll() is not None:
                    raise click.ClickException(f"{name} exited with {proc.returncode}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        click.echo("\nstopping…", err=True)
    finally:
        stop_all()
    click.echo("stopped", err=True)


def _ensure_staff(cli: list[str], env: dict[str, str], password: str) -> None:
    result = subprocess.run([*cli, "staff", "create", DEMO_STAFF_EMAIL, "--password-stdin"],
                            input=f"{password}\n", env=env, text=True, capture_output=True)
    if result.returncode != 0 and "already has an account" not in result.stderr:
        raise click.ClickException(f"could not create the demo staff account: {result.stderr}")
