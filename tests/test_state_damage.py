"""A damaged or unreachable zone database is one line that says what to do, from every command.

Real files damaged the ways disks and operators damage them (emptied,
overwritten, cut short, a page gone bad after the file opened), real
``meshfed`` processes, and real SQLite errors for the hints.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from meshfed.errors import ZoneError
from meshfed.sqlite import describe_error, open_database

_RESTORE = "restore the zone directory from a backup"


def meshfed_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshfed", *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def zone_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "east"
    made = meshfed_cli("zone", "init", "--dir", directory, "--name", "east", "--trust-domain", "east.mesh")
    assert made.returncode == 0, made.stderr
    # A zone in use: every component has made its tables in state.db.
    for command in (
        ("export", "add", "--service", "web", "--to", "west"),
        ("peer", "token", "--peer", "west", "--address", "127.0.0.1:15441"),
    ):
        used = meshfed_cli(*command[:2], "--dir", directory, *command[2:])
        assert used.returncode == 0, used.stderr
    return directory


def _empty(state: Path) -> None:
    state.write_bytes(b"")


def _garbage(state: Path) -> None:
    state.write_bytes(os.urandom(state.stat().st_size))


def _truncated(state: Path) -> None:
    with state.open("r+b") as file:
        file.truncate(state.stat().st_size // 2)


def _bad_pages(state: Path) -> None:
    """Every table's root page overwritten, except what opening reads: the file opens, then queries fail."""
    with sqlite3.connect(state) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        # Triggers have no pages of their own (root page 0).
        tables = "SELECT rootpage FROM sqlite_master WHERE tbl_name != 'meshfed_schema' AND rootpage > 0"
        roots = [row[0] for row in db.execute(tables)]
    with state.open("r+b") as file:
        for root in roots:
            file.seek(page_size * (root - 1))
            file.write(b"\xff" * page_size)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "empty": _empty,
    "garbage": _garbage,
    "truncated": _truncated,
    "bad pages": _bad_pages,
}
# Each command as (its words, its flags besides --dir).
COMMANDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "peer list": (("peer", "list"), ()),
    "up": (
        ("up",),
        (
            *("--api-address", "127.0.0.1:0", "--gateway-address", "127.0.0.1:0"),
            *("--peering-address", "127.0.0.1:0", "--establish-address", "127.0.0.1:0"),
            *("--egress-port-base", "0", "--log-level", "warning"),
        ),
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_damaged_state_db_is_one_line_saying_restore_it(zone_dir, damage, command):
    state = zone_dir / "state.db"
    assert not (zone_dir / "state.db-wal").exists(), "the zone left a WAL behind: damage would miss its pages"
    DAMAGE[damage](state)
    words, flags = COMMANDS[command]
    line = one_line(meshfed_cli(*words, "--dir", zone_dir, *flags))
    assert "is damaged" in line
    assert line.endswith(_RESTORE)
    if damage != "bad pages":  # found while opening: the file is named
        assert "state.db is damaged" in line
    if damage == "empty":
        assert state.stat().st_size == 0, "an empty state.db was taken for a new database and written to"


def test_an_empty_database_is_never_taken_for_a_new_one(tmp_path):
    path = tmp_path / "state.db"
    path.write_bytes(b"")
    with pytest.raises(ZoneError, match=f"state.db is damaged .*: {_RESTORE}"):
        open_database(path, "test", ["CREATE TABLE t (a);"])
    assert path.stat().st_size == 0
    fresh = open_database(tmp_path / "new.db", "test", ["CREATE TABLE t (a);"])  # a missing file is created
    fresh.close()


def test_a_read_only_database_says_so(tmp_path):
    path = tmp_path / "state.db"
    open_database(path, "test", ["CREATE TABLE t (a);"]).close()
    reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    with pytest.raises(sqlite3.Error) as refused:
        reader.execute("INSERT INTO t VALUES (1)")
    reader.close()
    message = describe_error(refused.value, path)
    assert message.startswith("state.db is read-only (attempt to write a readonly database)")
    assert "give this user write access" in message


def test_a_locked_database_says_who_to_wait_for(tmp_path):
    path = tmp_path / "state.db"
    open_database(path, "test", ["CREATE TABLE t (a);"]).close()
    writer, other = sqlite3.connect(path, isolation_level=None), sqlite3.connect(path, timeout=0, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.Error) as refused:
        other.execute("BEGIN IMMEDIATE")
    writer.close()
    other.close()
    assert "another meshfed process held a write" in describe_error(refused.value, path)


def test_a_database_this_user_may_not_open_names_the_owner_fix(zone_dir):
    state = zone_dir / "state.db"
    state.chmod(0)
    try:
        line = _as_another_user(lambda: _error_line(state))
    finally:
        state.chmod(0o600)
    assert "permission denied" in line
    assert "run meshfed as the user that owns the zone directory" in line


def _error_line(path: Path) -> str:
    try:
        open_database(path, "test", []).close()
    except ZoneError as err:
        return str(err)
    return "opened"


def _as_another_user(check: Callable[[], str]) -> str:
    """``check()`` run by a user who does not own the zone: a forked child that drops root, if we are root
    (root reads and writes files whatever their mode)."""
    if os.geteuid() != 0:
        return check()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover -- the child reports through the pipe
        try:
            os.setgid(65534)
            os.setuid(65534)  # nobody
            os.write(write_end, check().encode())
        except BaseException as err:
            os.write(write_end, f"{type(err).__name__}: {err}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        answer = reader.read().decode()
    os.waitpid(child, 0)
    return answer


def _run_out_of_files(code: str) -> str:
    """Run ``code`` in a fresh interpreter after every file descriptor below a low limit is taken."""
    script = textwrap.dedent(
        """
        import os, resource, sys
        import meshfed.cli, meshfed.sqlite  # imported first: imports open files too
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        held = []
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        """
    ) + textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout + result.stderr


def test_out_of_file_descriptors_says_raise_the_limit(zone_dir):
    output = _run_out_of_files(
        f"""
        from pathlib import Path
        from meshfed.errors import ZoneError
        try:
            meshfed.sqlite.open_database(Path({str(zone_dir / "state.db")!r}), "trust", [])
        except ZoneError as err:
            print(err)
        """
    )
    assert "too many open files: raise the open-file limit (ulimit -n)" in output


def test_the_cli_out_of_file_descriptors_is_one_line_saying_raise_the_limit(zone_dir):
    output = _run_out_of_files(
        f"""
        sys.argv = ["meshfed", "peer", "list", "--dir", {str(zone_dir)!r}]
        meshfed.cli.main()
        """
    )
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("meshfed: error: ")
    assert "ulimit -n" in lines[0]
