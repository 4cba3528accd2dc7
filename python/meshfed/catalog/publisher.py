"""Publishing a zone's imports into its catalog, on its own: never on the path that applies config.

Consul registrations and Kubernetes mirrors live in a server meshfed does not
own: it can refuse (ACLs, RBAC, admission), be down, or have the objects
deleted behind meshfed's back. So publication is a job of its own:

* the controller asks for it (:meth:`ImportPublisher.request`) after every
  applied config and never waits; requests made while one publication runs
  coalesce into one more, with the newest imports;
* a failure is kept (:attr:`status`, also written to ``state.db`` so the CLI
  and the API show it while the zone runs), logged as a warning once per
  distinct error, and retried with backoff — it never stops the zone from
  taking new catalog and export state or from telling peers about it;
* every ``resync`` interval it publishes again even when nothing changed, so
  imports someone deleted out of band come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshfed.catalog.model import LocalImport
from meshfed.catalog.source import CatalogSource
from meshfed.errors import MeshfedError
from meshfed.sqlite import SqliteStore, transaction
from meshfed.supervisor import Component, Supervisor

log = logging.getLogger(__name__)

DEFAULT_RESYNC = dt.timedelta(seconds=30)
_BACKOFF = (0.5, 30.0)

_MIGRATIONS = (
    """
    CREATE TABLE import_publication (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        source TEXT NOT NULL,
        last_error TEXT,
        failing_since TEXT,
        last_success_at TEXT,
        imports INTEGER NOT NULL
    ) STRICT;
    """,
)


@dataclass(frozen=True)
class PublicationStatus:
    """How publishing imports into the zone's catalog went last."""

    source: str
    imports: int = 0
    last_error: str | None = None
    failing_since: dt.datetime | None = None
    last_success_at: dt.datetime | None = None

    @property
    def ok(self) -> bool:
        return self.last_error is None


class PublicationStore(SqliteStore):
    """The last publication status, in ``state.db``: the running zone writes it, the CLI reads it."""

    COMPONENT, MIGRATIONS = "import_publication", _MIGRATIONS

    def __init__(self, path: Path) -> None:
        super().__init__(path)

    def put(self, status: PublicationStatus) -> None:
        with transaction(self._db):
            self._db.execute(
                "INSERT INTO import_publication VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "source = excluded.source, last_error = excluded.last_error, failing_since = excluded.failing_since,"
                " last_success_at = excluded.last_success_at, imports = excluded.imports",
                (
                    status.source,
                    status.last_error,
                    _iso(status.failing_since),
                    _iso(status.last_success_at),
                    status.imports,
                ),
            )

    def get(self) -> PublicationStatus | None:
        row = self._db.execute(
            "SELECT source, last_error, failing_since, last_success_at, imports FROM import_publication"
        ).fetchone()
        if row is None:
            return None
        source, error, since, success, count = row
        return PublicationStatus(str(source), int(count), error, _time(since), _time(success))


class ImportPublisher:
    """Keeps ``source`` publishing what ``imports()`` returns; see the module docstring."""

    def __init__(
        self,
        source: CatalogSource,
        imports: Callable[[], list[LocalImport]],
        *,
        describe: str,
        state_path: Path | None = None,
        resync: dt.timedelta = DEFAULT_RESYNC,
        backoff: tuple[float, float] = _BACKOFF,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._source = source
        self._imports = imports
        self._state_path = state_path
        self._resync = resync.total_seconds()
        self._backoff = backoff
        self._wanted = asyncio.Event()
        self._published = asyncio.Event()
        self._supervisor = supervisor or Supervisor(describe)
        self._task: Component | None = None
        self.status = PublicationStatus(source=describe)

    def request(self) -> None:
        """Publish the current imports soon; returns at once."""
        self._wanted.set()

    def start(self) -> None:
        if self._task is None:
            self._wanted.set()
            self._task = self._supervisor.spawn("import-publisher", self._run)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await task.cancel()

    async def published(self) -> PublicationStatus:
        """Wait for the next publication attempt to finish; returns its status (for tests and ``--wait``)."""
        self._published.clear()
        await self._published.wait()
        return self.status

    async def _run(self) -> None:
        delay = self._backoff[0]
        while True:
            # A failed publication retries after the backoff; a good one waits for a request or the resync.
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races the event.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay if not self.status.ok else self._resync):
                    await self._wanted.wait()
            self._wanted.clear()
            ok = await self._publish_once()
            delay = self._backoff[0] if ok else min(delay * 2, self._backoff[1])

    async def _publish_once(self) -> bool:
        try:
            return await self._attempt()
        finally:
            self._published.set()

    async def _attempt(self) -> bool:
        now = dt.datetime.now(dt.UTC)
        previous = self.status
        try:
            imports = await asyncio.to_thread(self._imports)
            await self._source.publish_imports(imports)
        except MeshfedError as err:
            message = str(err)
            if message != previous.last_error:
                log.warning(
                    "%s: imports are not published: %s (retrying; the zone keeps serving and peering)",
                    previous.source,
                    message,
                )
            failed = PublicationStatus(
                source=previous.source,
                imports=previous.imports,
                last_error=message,
                failing_since=previous.failing_since or now,
                last_success_at=previous.last_success_at,
            )
            await self._set(failed)
            return False
        if not previous.ok:
            log.warning("%s: imports are published again (%d)", previous.source, len(imports))
        elif previous.imports != len(imports) or previous.last_success_at is None:
            log.info("%s: %d import(s) published", previous.source, len(imports))
        await self._set(PublicationStatus(source=previous.source, imports=len(imports), last_success_at=now))
        return True

    async def _set(self, status: PublicationStatus) -> None:
        previous, self.status = self.status, status
        changed = (status.last_error, status.imports) != (previous.last_error, previous.imports)
        if self._state_path is None or not (changed or previous.last_success_at is None):
            return
        try:
            await asyncio.to_thread(self._record, self._state_path, status)
        except MeshfedError as err:
            log.warning("cannot record the import publication status in %s: %s", self._state_path, err)

    @staticmethod
    def _record(path: Path, status: PublicationStatus) -> None:
        with PublicationStore(path) as store:
            store.put(status)


def _iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _time(text: object) -> dt.datetime | None:
    return None if text is None else dt.datetime.fromisoformat(str(text))


__all__ = ["DEFAULT_RESYNC", "ImportPublisher", "PublicationStatus", "PublicationStore"]
