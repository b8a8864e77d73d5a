"""Prefect events herd emits, and the inbox watcher that emits them.

An annotation export landing in the preference inbox is announced as the event
``herd.preferences.inbox.landed`` on the resource ``herd.inbox.<file name>``, with payload
``{"path", "stamp"}``. The ``alignment-round`` and ``preference-inbox`` deployments (``infra/prefect.yaml``)
each have an automation expecting it, so a new batch is ingested at once and starts a round; automations
run on the open-source Prefect server.

:class:`InboxWatcher` runs inside ``herd deploy``: it polls the inbox every few seconds and emits one
event per export file that is new or changed, skipping files the inbox flow has already ingested in
that version. What it announced is kept in ``$HERD_HOME/preferences/inbox_events.json``, so a
restart announces nothing twice. Exports herd's own simulated annotator writes are entered there as they are
written (:func:`own_export`): the flow that wrote one ingests it itself, and announcing it would start
a round from every round's next-batch collection, one after another.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import threading
from pathlib import Path
from typing import Callable

from stages.common import write_json_atomic

log = logging.getLogger(__name__)

INBOX_EVENT = "herd.preferences.inbox.landed"
INBOX_RESOURCE_PREFIX = "herd.inbox."


def emit_inbox_event(path: str, stamp: str | None = None):
    """Announce that the export ``path`` landed in the inbox; the emitted event, or None when this
    process has no Prefect API to send events to."""
    from prefect.events import emit_event

    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    payload = {"path": str(path)}
    if stamp is not None:
        payload["stamp"] = stamp
    return emit_event(event=INBOX_EVENT,
                      resource={"prefect.resource.id": f"{INBOX_RESOURCE_PREFIX}{name}",
                                "prefect.resource.name": name},
                      payload=payload)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable ledger %s: %s", path, exc)
        return {}


@contextlib.contextmanager
def _ledger_lock(ledger: Path):
    """Serialise read-modify-write of the announced ledger (the watcher and the annotator task)."""
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with open(ledger.with_name(ledger.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ledger_of(inbox: str | Path) -> Path:
    """The announced-exports ledger of an inbox folder: ``inbox_events.json`` beside it."""
    return Path(inbox).parent / "inbox_events.json"


@contextlib.contextmanager
def own_export(inbox: str | Path, path: str | Path):
    """Around writing an export into ``inbox``: enter it as announced, under the ledger's lock held throughout,
    so the watcher (which checks the ledger again under that lock before announcing) leaves it to the flow that
    wrote it."""
    from tasks.preferences import inbox_files

    ledger = ledger_of(inbox)
    with _ledger_lock(ledger):
        yield
        stamp = inbox_files(str(inbox)).get(str(path))
        if stamp is not None:
            announced = _read_json(ledger)
            announced[str(path)] = stamp
            write_json_atomic(ledger, announced)


class InboxWatcher:
    """Poll ``inbox`` (a folder or fsspec URL) and emit one inbox event per new or changed export.

    ``ledger`` remembers ``{url: stamp}`` of what was announced; ``ingested_ledger`` is the inbox flow's
    ledger (``{url: {"stamp", "batch_id"}}``): a file already ingested in its current version is not
    news. ``emit`` is :func:`emit_inbox_event` unless a test passes another callable.
    """

    def __init__(self, inbox: str, ledger: Path, ingested_ledger: Path | None = None, interval: float = 5.0,
                 emit: Callable[[str, str], object] = emit_inbox_event):
        self.inbox, self.ledger, self.ingested_ledger = inbox, Path(ledger), ingested_ledger
        self.interval, self.emit = interval, emit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> list[str]:
        """One scan: emit an event for each unannounced export; return their urls."""
        from tasks.preferences import inbox_files

        announced = _read_json(self.ledger)
        ingested = _read_json(self.ingested_ledger) if self.ingested_ledger else {}
        sent = []
        for url, stamp in inbox_files(self.inbox).items():
            if announced.get(url) == stamp or (ingested.get(url) or {}).get("stamp") == stamp:
                continue
            with _ledger_lock(self.ledger):
                announced = _read_json(self.ledger)  # again, under the lock: the annotator may have entered it
                if announced.get(url) == stamp:
                    continue
                if self.emit(url, stamp) is None:
                    log.warning("could not emit %s for %s (no Prefect API configured?); will retry", INBOX_EVENT, url)
                    continue
                announced[url] = stamp
                write_json_atomic(self.ledger, announced)
            log.info("announced %s: %s", INBOX_EVENT, url)
            sent.append(url)
        return sent

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # noqa: BLE001  (a flaky filesystem must not end the watcher)
                log.exception("inbox watcher: scanning %s failed; retrying in %.0f s", self.inbox, self.interval)
            self._stop.wait(self.interval)

    def start(self) -> "InboxWatcher":
        self._thread = threading.Thread(target=self._loop, name="herd-inbox-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def inbox_watcher(settings, interval: float = 5.0) -> InboxWatcher:
    """The watcher of herd's default inbox ``$HERD_HOME/preferences/inbox``."""
    p = settings.preferences
    return InboxWatcher(str(p / "inbox"), ledger_of(p / "inbox"), p / "inbox_ledger.json", interval)
