"""Named crash points for fault-injection tests.

``PARTNER_FAILPOINTS="after_token_response_before_commit=kill"`` makes the process
SIGKILL itself when it reaches that point, exactly as a power cut or an OOM kill
would stop it there. ``=sleep:<seconds>`` pauses instead. Unset (always, in
production) every point is a no-op costing one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "PARTNER_FAILPOINTS"

POINTS = (
    "before_token_post",
    "after_token_response_before_commit",
    "after_commit_before_first_use",
)


def _parse(raw: str) -> dict[str, str]:
    actions: dict[str, str] = {}
    for item in raw.split(","):
        name, _, action = item.strip().partition("=")
        if name:
            actions[name] = action or "kill"
    return actions


def reach(point: str) -> None:
    """Act on ``point`` if the environment armed it."""
    raw = os.environ.get(ENV)
    if not raw:
        return
    action = _parse(raw).get(point)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
