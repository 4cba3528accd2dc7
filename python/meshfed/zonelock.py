"""One running process per zone: an exclusive lock on ``zone.lock`` in the zone directory.

Two ``meshfed up`` of one zone would both write its state and both answer its
peers; worse, with port reuse the kernel splits peering streams between them.
``meshfed up`` therefore takes this lock before anything binds and holds it
for the life of the process.

The lock is ``flock(2)`` on an open file, so the kernel drops it when the
holder exits however it exits: a crash never leaves a stale lock to clean up.
The holder writes its pid into the file so that the refused process can name
it; the file is never deleted (a process could be locking the old inode while
another creates a new one). Only ``meshfed up`` takes the lock: the other
commands write the zone's state while it runs, which SQLite serializes.

A process that campaigns to lead its zone (``--leader-lease``, ``--leader-lock``)
holds the lock while it follows, and says so in the file (:func:`mark_following`):
its directory is not the zone's state then (the leader's is, and a replica
restored when this process leads replaces it), so commands that would change
it refuse (:func:`following_pid`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from meshfed.errors import ZoneError

__all__ = ["LOCK_FILE", "following_pid", "hold_zone_lock", "mark_following"]

LOCK_FILE = "zone.lock"
_PID_BYTES = 32  # far more than any pid's decimal text; what the refused process reads of the file
_FOLLOWING = "following"


@contextlib.contextmanager
def hold_zone_lock(directory: Path, zone_name: str) -> Iterator[Path]:
    """Hold the zone's lock for the ``with`` block; a second holder gets a one-line :class:`ZoneError`.

    Yields the lock file's path. Raises at once (never waits) when another
    process holds the lock, naming its pid.
    """
    path = directory / LOCK_FILE
    try:
        # os.open makes the descriptor non-inheritable: no child process can keep the lock alive.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise ZoneError(
            f"cannot open {path}: {err.strerror or err}; is the zone directory writable by this user?"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ZoneError(
                f"zone {zone_name} is already running ({_holder(fd)} holds {path}); stop it first"
            ) from None
        except OSError as err:
            raise ZoneError(
                f"cannot lock {path}: {err.strerror or err}; is the zone directory on a local disk?"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            # Emptied while still held, so the file never names a process that has let go.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def mark_following(lock: Path, following: bool) -> None:
    """Say in the held ``lock`` (:func:`hold_zone_lock`'s path) whether this process follows its zone's leader."""
    text = f"{os.getpid()} {_FOLLOWING}\n" if following else f"{os.getpid()}\n"
    fd = os.open(lock, os.O_WRONLY)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
    finally:
        os.close(fd)


def following_pid(directory: Path) -> int | None:
    """The pid of a live ``meshfed up`` that holds ``directory``'s lock as a follower; None if none does."""
    try:
        text = (directory / LOCK_FILE).read_bytes()[:_PID_BYTES].decode("ascii", "replace").split()
    except OSError:
        return None
    if len(text) != 2 or text[1] != _FOLLOWING or not text[0].isdigit():
        return None
    pid = int(text[0])
    try:
        os.kill(pid, 0)  # a crashed follower's file still names it; a pid that is gone follows nothing
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # another user's live process
    return pid


def _holder(fd: int) -> str:
    # The holder writes its pid just after it locks: a racing reader may find the file still empty.
    text = os.pread(fd, _PID_BYTES, 0).decode("ascii", "replace").split()
    return f"pid {text[0]}" if text and text[0].isdigit() else "another process"
