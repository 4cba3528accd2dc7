"""What a running controller knows that other processes cannot work out: tables in ``state.db``.

The CLI reads the zone directory, not the running process. Most of a zone's
state is there already (catalog, exports, imports, peerings), but two things
exist only in the running controller:

* whether it runs at all: a lease, renewed every second, that lapses after
  :data:`LEASE_TIMEOUT` (a crashed zone stops renewing it; a stopped one
  releases it);
* where its gateway's listeners are bound: with ``--egress-port-base 0`` the
  ports are ephemeral, and the host local clients use is the egress
  advertise host, a flag of ``meshfed up``.

One writer: the running :class:`~meshfed.controller.Controller`. Readers
(``meshfed catalog list``) trust the addresses only while the lease is alive;
otherwise they say the zone is not running. The gateway's health verdict on
local endpoints is kept beside the health version it belongs to
(:meth:`meshfed.federation.exports.ExportRules.unhealthy_endpoints`), and a
peering's live connection with the peering service's own lease
(:mod:`meshfed.federation.peering_store`).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from meshfed.sqlite import SqliteStore, transaction

STATE_FILE = "state.db"  # the zone's own state; the one definition of its name
# The tables here that describe a running process, not the zone: a copy of the zone's state made for
# another process (meshfed.replica) leaves their rows out, so no copy claims a live controller.
PROCESS_TABLES = ("controller_lease", "listener_addresses")
# The controller renews its lease every second; readers call it gone after this long without.
LEASE_TIMEOUT = dt.timedelta(seconds=5)
LEASE_RENEW_SECONDS = 1.0

_MIGRATIONS = (
    """
    CREATE TABLE controller_lease (
        only INTEGER PRIMARY KEY CHECK (only = 1),
        pid INTEGER NOT NULL,
        started_at TEXT NOT NULL,
        alive_at TEXT NOT NULL
    ) STRICT;
    CREATE TABLE listener_addresses (listener TEXT PRIMARY KEY, host TEXT NOT NULL, port INTEGER NOT NULL) STRICT;
    """,
)

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Lease:
    """The running controller's lease, as last renewed."""

    pid: int
    started_at: dt.datetime
    alive_at: dt.datetime

    def alive(self, now: dt.datetime | None = None) -> bool:
        return (now or dt.datetime.now(dt.UTC)) - self.alive_at < LEASE_TIMEOUT


class RunState(SqliteStore):
    """The running controller's lease and bound listeners. Use as a context manager."""

    COMPONENT, MIGRATIONS = "runstate", _MIGRATIONS

    def __init__(self, zone_directory: Path) -> None:
        super().__init__(zone_directory / STATE_FILE)

    # -- the controller's side ----------------------------------------------

    def take_lease(self, now: dt.datetime | None = None) -> None:
        """A controller starts: the lease is its own (a previous holder's listeners are forgotten)."""
        moment = _iso(now or dt.datetime.now(dt.UTC))
        with transaction(self._db):
            self._db.execute(
                "INSERT OR REPLACE INTO controller_lease VALUES (1, ?, ?, ?)", (os.getpid(), moment, moment)
            )
            self._db.execute("DELETE FROM listener_addresses")

    def renew_lease(self, now: dt.datetime | None = None) -> None:
        with transaction(self._db):
            self._db.execute("UPDATE controller_lease SET alive_at = ?", (_iso(now or dt.datetime.now(dt.UTC)),))

    def release_lease(self) -> None:
        """The controller stopped: readers see at once that it no longer runs."""
        with transaction(self._db):
            self._db.execute("UPDATE controller_lease SET alive_at = ?", (_iso(_EPOCH),))
            self._db.execute("DELETE FROM listener_addresses")

    def record_listeners(self, addresses: Mapping[str, tuple[str, int]]) -> None:
        """Where each listener serves now (host as local clients reach it), replacing what was recorded."""
        with transaction(self._db):
            self._db.execute("DELETE FROM listener_addresses")
            self._db.executemany(
                "INSERT INTO listener_addresses VALUES (?, ?, ?)",
                [(name, host, port) for name, (host, port) in sorted(addresses.items())],
            )

    # -- readers --------------------------------------------------------------

    def lease(self) -> Lease | None:
        row = self._db.execute("SELECT pid, started_at, alive_at FROM controller_lease").fetchone()
        if row is None:
            return None
        return Lease(int(row[0]), dt.datetime.fromisoformat(row[1]), dt.datetime.fromisoformat(row[2]))

    def running(self, now: dt.datetime | None = None) -> bool:
        """True while a controller of the zone holds a live lease."""
        lease = self.lease()
        return lease is not None and lease.alive(now)

    def listeners(self) -> dict[str, tuple[str, int]]:
        """The recorded listener addresses by name; only meaningful while :meth:`running`."""
        rows = self._db.execute("SELECT listener, host, port FROM listener_addresses").fetchall()
        return {str(name): (str(host), int(port)) for name, host, port in rows}


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat()


__all__ = ["LEASE_TIMEOUT", "STATE_FILE", "Lease", "RunState"]
