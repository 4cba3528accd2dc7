"""Who may call what: every route of a zone's API walked with no token, a wrong one, the read and the admin token.

The walk covers every route the app has, including ones added after this test
was written: a new read must need a token and a new mutation the admin token,
or this suite fails. The zone runs for real (controller, gateway, peering) on
loopback, so a read that passes authentication is answered by the real handler.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from meshfed.api.auth import NEEDS_ADMIN, NEEDS_READER, READ_ONLY, WRONG_ADMIN, WRONG_TOKEN
from meshfed.cli import app as cli
from meshfed.controller import ControllerSettings
from meshfed.errors import ZoneError
from meshfed.federation.settings import PeeringSettings
from meshfed.runtime import ZoneSettings, assemble_zone
from meshfed.zone import READ_TOKEN_FILE, TOKEN_FILE, Zone

LOOPBACK = ZoneSettings(
    controller=ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0, health_check=None),
    peering=PeeringSettings(listen_address="127.0.0.1:0", establish_address="127.0.0.1:0"),
)
# Taken without a token: liveness, readiness, metrics, and the zone's own bundle (public by design).
OPEN = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/v1/trust/bundle")}
# Reads that only the admin may make: the running config (its key is redacted, its shape is not).
ADMIN_READS = {("GET", "/v1/gateway/config")}
# Reads of the zone's topology that the read token must reach (the walk finds any others too).
TOPOLOGY_READS = {
    "/v1/zone",
    "/v1/gateway/stats",
    "/v1/catalog",
    "/v1/exports",
    "/v1/trust/bundles",
    "/v1/peerings",
    "/v1/peerings/{name}",
    "/v1/status",
    "/v1/explain/{namespace}/{service}",
    "/v1/authz",
}


@pytest.fixture
def zone(make_zone) -> Zone:
    zone: Zone = make_zone("east")
    return zone


@pytest.fixture
def api(zone: Zone) -> Iterator[TestClient]:
    with TestClient(assemble_zone(zone, LOOPBACK).app()) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def routes(client: TestClient) -> list[tuple[str, str]]:
    """(method, path template) of every operation the app serves, as its OpenAPI spec lists them.

    The spec rather than ``app.routes``: FastAPI keeps included routers as
    private wrappers there, and every meshfed route is in the spec.
    """
    paths: dict[str, dict[str, object]] = client.get("/openapi.json").json()["paths"]
    return [(method.upper(), path) for path, operations in paths.items() for method in operations]


def concrete(path: str) -> str:
    # Any value will do: authentication is decided before the handler looks anything up.
    return re.sub(r"\{[^}]+\}", "x", path)


def test_every_route_is_open_read_or_admin(api: TestClient, zone: Zone) -> None:
    reader, admin = bearer(zone.read_token()), bearer(zone.admin_token())
    wrong = bearer("not-a-token-of-this-zone")
    walked = routes(api)
    assert set(walked) >= OPEN
    assert {path for method, path in walked if method == "GET"} >= TOPOLOGY_READS
    for method, template in walked:
        path, where = concrete(template), f"{method} {template}"
        if (method, template) in OPEN:
            assert api.request(method, path).status_code == 200, where
            continue
        anonymous = api.request(method, path)
        assert anonymous.status_code == 401, where
        assert anonymous.headers["www-authenticate"] == "Bearer", where
        mutation = method != "GET" or (method, template) in ADMIN_READS
        assert anonymous.json()["detail"] == (NEEDS_ADMIN if mutation else NEEDS_READER), where
        refused = api.request(method, path, headers=wrong)
        assert (refused.status_code, refused.json()["detail"]) == (403, WRONG_ADMIN if mutation else WRONG_TOKEN), where
        as_reader = api.request(method, path, headers=reader)
        if mutation:
            assert (as_reader.status_code, as_reader.json()["detail"]) == (403, READ_ONLY), where
        else:
            # Past authentication: the handler answers (a 404 for the made-up name of a peering).
            assert as_reader.status_code in (200, 404), (where, as_reader.text)
            assert api.request(method, path, headers=admin).status_code == as_reader.status_code, where


def test_the_read_token_reads_topology_and_changes_nothing(api: TestClient, zone: Zone) -> None:
    reader, admin = bearer(zone.read_token()), bearer(zone.admin_token())
    assert api.get("/v1/zone", headers=reader).json()["name"] == "east"
    assert api.get("/v1/trust/bundles", headers=reader).json()["trust_domains"][0]["trust_domain"] == "east.mesh"
    refused = api.post("/v1/exports", json={"service": "web", "to": ["west"]}, headers=reader)
    assert refused.status_code == 403
    assert "read-only" in refused.json()["detail"]
    assert api.get("/v1/exports", headers=reader).json() == []
    assert api.post("/v1/exports", json={"service": "web", "to": ["west"]}, headers=admin).status_code == 201
    assert api.get("/v1/exports", headers=reader).json() == [{"service": "web", "namespace": "default", "peer": "west"}]


def test_the_open_routes_answer_without_a_token(api: TestClient, zone: Zone) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json()["status"] == "ready"
    assert "meshfed_gateway_connections_total" in api.get("/metrics").text
    assert api.get("/v1/trust/bundle").content == zone.trust.own_bundle().to_spiffe_json()


def test_the_tokens_are_distinct_private_files(zone: Zone) -> None:
    read, admin = zone.directory / READ_TOKEN_FILE, zone.directory / TOKEN_FILE
    for path in (read, admin):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert len(zone.read_token()) >= 32
    assert zone.read_token() != zone.admin_token()
    assert zone.read_token() == Zone.open(zone.directory).read_token()  # made once, then kept


def test_a_zone_made_before_read_tokens_gets_one_on_first_open(zone: Zone) -> None:
    (zone.directory / READ_TOKEN_FILE).unlink()
    reopened = Zone.open(zone.directory)
    path = zone.directory / READ_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert len(token) >= 32
    assert token not in (zone.admin_token(), "")
    assert reopened.read_token() == token
    assert not list(zone.directory.glob(".read-token*"))  # no temporary file left behind


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run a command in a zone another user owns")
def test_root_making_the_read_token_gives_it_to_the_zones_owner(zone: Zone) -> None:
    (zone.directory / READ_TOKEN_FILE).unlink()
    before = zone.directory.stat()
    os.chown(zone.directory, 4321, 4321)
    try:
        Zone.open(zone.directory)
        made = (zone.directory / READ_TOKEN_FILE).stat()
        assert (made.st_uid, made.st_gid, stat.S_IMODE(made.st_mode)) == (4321, 4321, 0o600)
    finally:
        os.chown(zone.directory, before.st_uid, before.st_gid)


def test_an_old_zone_it_cannot_write_still_opens_and_says_why_it_has_no_read_token(
    zone: Zone, monkeypatch: pytest.MonkeyPatch
) -> None:
    (zone.directory / READ_TOKEN_FILE).unlink()

    def refused(*args: object, **kwargs: object) -> tuple[int, str]:
        # What a zone directory owned by another user gives (a chmod does not stop root, who runs CI).
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("meshfed.zone.tempfile.mkstemp", refused)
    reopened = Zone.open(zone.directory)  # the commands that only read keep working
    with pytest.raises(ZoneError, match=r"cannot create .*read-token: Permission denied; run a meshfed command"):
        reopened.read_token()
    assert not (zone.directory / READ_TOKEN_FILE).exists()


def test_zone_token_prints_either_token(zone: Zone) -> None:
    runner = CliRunner()
    read = runner.invoke(cli, ["zone", "token", "--dir", str(zone.directory), "--read"])
    assert read.exit_code == 0, read.output
    assert read.stdout == f"{zone.read_token()}\n"
    admin = runner.invoke(cli, ["zone", "token", "--dir", str(zone.directory), "--admin", "-o", "json"])
    assert admin.exit_code == 0, admin.output
    assert json.loads(admin.stdout) == {
        "zone": "east",
        "kind": "admin",
        "token": zone.admin_token(),
        "file": str(zone.directory / TOKEN_FILE),
    }
    for flags in ([], ["--read", "--admin"]):
        refused = runner.invoke(cli, ["zone", "token", "--dir", str(zone.directory), *flags])
        assert refused.exit_code == 2
        assert "choose one of --read or --admin" in refused.output


def test_zone_init_makes_the_read_token(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["zone", "init", "--dir", str(tmp_path / "west"), "--name", "west", "--trust-domain", "west.mesh"]
    )
    assert result.exit_code == 0, result.output
    path = tmp_path / "west" / READ_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == Zone.open(tmp_path / "west").read_token()
