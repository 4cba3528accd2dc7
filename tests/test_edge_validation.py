"""Input refused at the edge: one line naming the field and what to do, from the real ``meshfed`` command.

Each case runs the CLI as a user does (a subprocess, real files); the API
cases go through a real zone behind its real API. The limits the CLI and the
API share are one definition each (the token TTL cap, the service
registration), so both refuse the same input.
"""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from meshfed.catalog.embedded import CATALOG_FILE, EmbeddedCatalog
from meshfed.federation.token import MAX_TOKEN_TTL
from meshfed.runtime import assemble_zone
from meshfed.sqlite import DATABASE_MODE
from meshfed.zone import Zone
from tests.test_audit import LOOPBACK, bearer
from tests.test_cli import _assert_one_line_error, meshfed_cli

ONCE = ("--endpoint", "127.0.0.1:8080")
TWICE = ("--endpoint", "127.0.0.1:8080", "--endpoint", "127.0.0.1:8080;version=v2")


@pytest.fixture
def east(tmp_path: Path) -> Path:
    directory = tmp_path / "east"
    result = meshfed_cli("zone", "init", "--dir", directory, "--name", "east", "--trust-domain", "east.mesh")
    assert result.returncode == 0, result.stderr
    return directory


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("export", "add", "--service", "web", "--namespace", "BAD NS", "--to", "west"), ("namespace 'BAD NS'",)),
        (("export", "add", "--service", "Web", "--to", "west"), ("service 'Web'", "DNS label")),
        (("peer", "token", "--peer", "Has Space", "--address", "127.0.0.1:15441"), ("'Has Space'", "DNS label")),
        (("peer", "token", "--peer", "\U0001f600", "--address", "127.0.0.1:15441"), ("DNS label",)),
        (("peer", "token", "--peer", "west", "--ttl", "99999d", "--address", "127.0.0.1:15441"), ("at most 7 days",)),
        (("peer", "token", "--peer", "west", "--ttl", "7d1s", "--address", "127.0.0.1:15441"), ("at most 7 days",)),
        (
            ("service", "register", "--name", "web", "--port", "http=8080", "--port", "http=9090", *ONCE),
            ("ports: port name 'http' is given twice",),
        ),
        (
            ("service", "register", "--name", "web", "--port", "http=8080", *TWICE),
            ("endpoints: endpoint 127.0.0.1:8080 is given twice",),
        ),
        (
            ("service", "register", "--name", "web", "--port", "http=8080", "--endpoint", "127.0.0.1:8080;weight=0"),
            ("endpoints[0].weight:", "greater than or equal to 1"),
        ),
        (
            ("service", "register", "--name", "Web", "--port", "http=8080", "--endpoint", "127.0.0.1:8080"),
            ("name: service name 'Web' must be a DNS label",),
        ),
        (("authz", "add", "--service", "web", "--allow", "spiffe://west.mesh/a*b"), ("id:",)),
    ],
)
def test_bad_input_is_one_line_naming_the_field(east: Path, args: tuple[str, ...], fragments: tuple[str, ...]) -> None:
    command, rest = args[:2], args[2:]
    result = meshfed_cli(*command, "--dir", east, *rest)
    _assert_one_line_error(result, *fragments)
    with EmbeddedCatalog(east) as catalog:
        assert catalog.load().services == []


def test_a_token_of_exactly_the_cap_is_issued(east: Path) -> None:
    days = MAX_TOKEN_TTL.days
    result = meshfed_cli(
        "peer", "token", "--dir", east, "--peer", "west", "--ttl", f"{days}d", "--address", "1.2.3.4:1"
    )
    assert result.returncode == 0, result.stderr


def test_export_of_a_service_not_in_the_catalog_is_kept_with_a_note(east: Path) -> None:
    result = meshfed_cli("export", "add", "--dir", east, "--service", "web", "--to", "west")
    assert result.returncode == 0, result.stderr
    assert "exported web.default to west" in result.stdout.decode()
    assert "catalog has no service web.default yet" in result.stderr.decode()
    registered = meshfed_cli(
        "service", "register", "--dir", east, "--name", "web", "--port", "http=8080", "--endpoint", "127.0.0.1:8080"
    )
    assert registered.returncode == 0, registered.stderr
    again = meshfed_cli("export", "add", "--dir", east, "--service", "web", "--to", "north")
    assert again.returncode == 0
    assert "no service" not in again.stderr.decode()


def test_every_database_is_readable_by_its_owner_only(east: Path) -> None:
    registered = meshfed_cli(
        "service", "register", "--dir", east, "--name", "web", "--port", "http=8080", "--endpoint", "127.0.0.1:8080"
    )
    assert registered.returncode == 0, registered.stderr
    databases = sorted(path.name for path in east.iterdir() if path.name.endswith(".db"))
    assert databases == [CATALOG_FILE, "state.db"]
    for name in databases:
        assert stat.S_IMODE((east / name).stat().st_mode) == DATABASE_MODE == 0o600, name
    # A catalog.db an older meshfed left readable to all is narrowed when it is next opened, WAL files too.
    (east / CATALOG_FILE).chmod(0o644)
    with EmbeddedCatalog(east) as catalog:
        catalog.load()
        assert stat.S_IMODE((east / CATALOG_FILE).stat().st_mode) == 0o600
        assert stat.S_IMODE((east / f"{CATALOG_FILE}-wal").stat().st_mode) == 0o600


def test_the_api_refuses_what_the_cli_refuses(east: Path) -> None:
    zone = Zone.open(east)
    admin = bearer(zone.admin_token())
    with TestClient(assemble_zone(zone, LOOPBACK).app()) as api:
        cap = int(MAX_TOKEN_TTL.total_seconds())
        too_long = api.post("/v1/peerings/tokens", json={"peer_name": "west", "ttl_seconds": cap + 1}, headers=admin)
        assert too_long.status_code == 422
        assert too_long.json()["detail"][0]["loc"] == ["body", "ttl_seconds"]
        spaced = api.post("/v1/peerings/tokens", json={"peer_name": "Has Space"}, headers=admin)
        assert spaced.status_code == 422
        assert spaced.json()["detail"][0]["loc"] == ["body", "peer_name"]
        assert "DNS label" in spaced.json()["detail"][0]["msg"]
        issued = api.post("/v1/peerings/tokens", json={"peer_name": "west", "ttl_seconds": cap}, headers=admin)
        assert issued.status_code == 201, issued.text
        expires = dt.datetime.fromisoformat(issued.json()["expires_at"])
        assert expires - dt.datetime.now(dt.UTC) <= MAX_TOKEN_TTL
