"""``partner-app staff create`` from scripts that run in a terminal.

A hidden prompt reads the controlling terminal, not standard input: the demo (and any
script) run from a terminal would stop there, waiting for someone to type a password
it had already piped in. ``--password-stdin`` reads the first line of standard input
and never touches the terminal. The command runs here as a process whose controlling
terminal is a pseudo-terminal, as under an interactive shell.
"""

from __future__ import annotations

import fcntl
import os
import pty
import subprocess
import sys
import termios

from sqlalchemy import select

from partner_app.db import db
from partner_app.security.models import StaffUser
from partner_app.security.staff import authenticate
from tests.conftest import ROOT, settings_env

EMAIL = "script@partner.example"
PASSWORD = "a-long-enough-password"


def _in_a_terminal(argv: list[str], env: dict[str, str], stdin: str) -> tuple[int, str, str]:
    """Run ``argv`` with a fresh pseudo-terminal as its controlling terminal and pipes
    for its standard streams; returns (exit code, stdout, what reached the terminal)."""
    controller, terminal = pty.openpty()

    def take_terminal() -> None:
        os.setsid()
        fcntl.ioctl(terminal, termios.TIOCSCTTY, 0)

    try:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=take_terminal, pass_fds=(terminal,))
        try:
            out, _ = proc.communicate(stdin, timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += "\n(still running after 30 s)"
        os.set_blocking(controller, False)
        try:
            shown = os.read(controller, 4096).decode(errors="replace")
        except BlockingIOError:
            shown = ""
        return proc.returncode, out, shown
    finally:
        os.close(controller)
        os.close(terminal)


def test_password_stdin_creates_the_account_without_asking_the_terminal(
        app_ctx, backend_urls, sandbox):
    env = {**os.environ, **settings_env(backend_urls, sandbox_url=sandbox.base_url)}
    code, out, shown = _in_a_terminal(
        [sys.executable, "-m", "partner_app.cli", "staff", "create", EMAIL, "--role",
         "viewer", "--password-stdin"], env, f"{PASSWORD}\n")

    assert code == 0, out
    assert f"created viewer account {EMAIL}" in out
    assert "Password" not in shown
    staff = db.session.scalar(select(StaffUser).where(StaffUser.email == EMAIL))
    assert staff is not None and staff.role == "viewer"
    assert authenticate(EMAIL, PASSWORD) == staff
