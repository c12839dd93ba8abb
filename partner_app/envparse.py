"""Reading numbers from the environment, collecting problems instead of raising.

Used by every settings parser so a bad start lists all bad variables at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

N = TypeVar("N", int, float)


def number(env: Mapping[str, str], name: str, default: N | None, problems: list[str], *,
           cast: Callable[[str], N] = int, low: N, high: N) -> N | None:
    """``env[name]`` as a number in [low, high]; the default (and a problem line) if not."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        problems.append(f"{name} must be {'an integer' if cast is int else 'a number'}")
        return default
    if not low <= value <= high:
        problems.append(f"{name} must be between {low} and {high}")
        return default
    return value
