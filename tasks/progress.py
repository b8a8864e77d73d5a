"""A process-local progress hook: the CLI installs a bar, tasks report finished stages to it."""

from __future__ import annotations

from collections.abc import Callable

_listener: Callable[[str, dict], None] | None = None


def set_listener(fn: Callable[[str, dict], None] | None) -> None:
    global _listener
    _listener = fn


def report(stage: str, info: dict | None = None) -> None:
    if _listener is not None:
        _listener(stage, info or {})
