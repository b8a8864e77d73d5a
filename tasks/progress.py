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


_item_listener: Callable[[str, int, int], None] | None = None


def set_item_listener(fn: Callable[[str, int, int], None] | None) -> None:
    global _item_listener
    _item_listener = fn


def report_items(what: str, done: int, total: int) -> None:
    """Progress inside a stage (items of a benchmark): shown on the same bar, never a second one."""
    if _item_listener is not None:
        _item_listener(what, done, total)
