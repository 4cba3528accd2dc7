"""The audit log: every admin mutation, through the API or the CLI, is one line naming who, what and when.

Real zones on loopback (controller, gateway, peering) behind their real API,
and the real CLI in process. Each test also checks what must not be there: a
line for a read, for a refused or failed call, or any secret (the zone's
tokens, a peering token, key material).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from meshfed import audit
from meshfed.cli import app as cli
from meshfed.controller import ControllerSettings
from meshfed.federation.peer_status import PeerStatus
from meshfed.federation.settings import PeeringSettings
from meshfed.runtime import ZoneSettings, assemble_zone
from meshfed.zone import Zone
from tests.test_trust_cli import _assert_no_secrets

LOOPBACK = ZoneSettings(
    controller=ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0, health_check=None),
    peering=PeeringSettings(listen_address="127.0.0.1:0", establish_address="127.0.0.1:0", advertise_host="127.0.0.1"),
)
API_ACTOR = "api:admin@testclient"  # the client host TestClient's requests come from


def audit_lines(zone: Zone) -> list[dict[str, Any]]:
    path = zone.directory / audit.AUDIT_FILE
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@contextmanager
def running(zone: Zone) -> Iterator[TestClient]:
    with TestClient(assemble_zone(zone, LOOPBACK).app()) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_when(line: dict[str, Any], since: dt.datetime) -> None:
    at = dt.datetime.fromisoformat(line["ts"])
    assert at.tzinfo is not None, line
    assert since - dt.timedelta(seconds=1) <= at <= dt.datetime.now(dt.UTC), line


def cli_run(*args: str, stdin: str | None = None) -> str:
    result = CliRunner().invoke(cli, list(args), input=stdin)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_each_api_mutation_is_one_line_and_reads_and_refusals_are_none(make_zone) -> None:
    east, west = make_zone("east"), make_zone("west")
    since = dt.datetime.now(dt.UTC)
    with running(east) as api:
        admin, reader = bearer(east.admin_token()), bearer(east.read_token())
        for path in (
            "/v1/zone",
            "/v1/catalog",
            "/v1/exports",
            "/v1/peerings",
            "/v1/trust/bundles",
            "/v1/gateway/stats",
        ):
            assert api.get(path, headers=admin).status_code == 200, path
            assert api.get(path, headers=reader).status_code == 200, path
        assert api.get("/v1/gateway/config", headers=admin).status_code == 200
        # Refused (no token, the read token) and failed (nothing to remove) calls change nothing: no line.
        web = {"service": "web", "to": ["west", "north"]}
        assert api.post("/v1/exports", json=web).status_code == 401
        assert api.post("/v1/exports", json=web, headers=reader).status_code == 403
        assert api.delete("/v1/exports/default/nothing", headers=admin).status_code == 404
        assert audit_lines(east) == []

        calls: list[tuple[str, str, dict[str, Any], int]] = [
            ("POST", "/v1/exports", {"json": web}, 201),
            ("DELETE", "/v1/exports/default/web", {}, 200),
            ("POST", "/v1/catalog/confirm-empty", {}, 200),
            ("POST", "/v1/gateway/reconfigure", {}, 204),
            ("POST", "/v1/peerings/tokens", {"json": {"peer_name": "west"}}, 201),
            ("POST", "/v1/peerings/refresh", {}, 204),
            ("PUT", "/v1/trust/bundles/west.mesh", {"content": west.trust.own_bundle().to_spiffe_json()}, 200),
            ("POST", "/v1/trust/rotate", {"json": {"overlap_seconds": 3600}}, 200),
            (
                "POST",
                "/v1/trust/federations",
                {
                    "json": {
                        "trust_domain": "north.mesh",
                        "endpoint_url": "https://127.0.0.1:9/",
                        "profile": "https_web",
                    }
                },
                201,
            ),
        ]
        outputs = []
        for method, path, body, expected in calls:
            response = api.request(method, path, headers=admin, **body)
            assert response.status_code == expected, (method, path, response.text)
            outputs.append(response.content)
        peering_token = orjson.loads(outputs[4])["token"]
    lines = audit_lines(east)
    assert [(line["method"], line["path"]) for line in lines] == [(method, path) for method, path, _, _ in calls]
    assert [(line["action"], line["target"]) for line in lines] == [
        ("export.add", "web.default"),
        ("export.remove", "web.default"),
        ("catalog.confirm_empty", "zone east"),
        ("gateway.reconfigure", "zone east"),
        ("peer.token", "peer west"),
        ("peer.refresh", "zone east"),
        ("trust.import", "west.mesh"),
        ("trust.rotate", "east.mesh"),
        ("trust.federate", "north.mesh"),
    ]
    for line in lines:
        assert line["actor"] == API_ACTOR, line
        assert_when(line, since)
    assert lines[0]["to"] == ["north", "west"]
    assert lines[4]["expires_at"] > since.isoformat()
    raw = (east.directory / audit.AUDIT_FILE).read_bytes()
    for secret in (peering_token, east.admin_token(), east.read_token()):
        assert secret.encode() not in raw
    _assert_no_secrets(east, raw)


def test_peering_through_api_and_cli_is_audited_on_each_side_without_the_token(make_zone) -> None:
    east, west, north = make_zone("east"), make_zone("west"), make_zone("north")
    since = dt.datetime.now(dt.UTC)
    with running(east) as east_api, running(west) as west_api:
        issued = east_api.post("/v1/peerings/tokens", json={"peer_name": "west"}, headers=bearer(east.admin_token()))
        assert issued.status_code == 201
        west_admin = bearer(west.admin_token())
        established = west_api.post(
            "/v1/peerings/establish", json={"token": issued.json()["token"]}, headers=west_admin
        )
        assert established.status_code == 201, established.text
        assert west_api.delete("/v1/peerings/east", headers=west_admin).status_code == 204
        # The CLI, against the same running acceptor: a token on east, redeemed by north, then deleted there.
        cli_token = cli_run("peer", "token", "--dir", str(east.directory), "--peer", "north").strip()
        made = orjson.loads(
            cli_run("peer", "establish", "--dir", str(north.directory), "-o", "json", "-", stdin=cli_token)
        )
        assert list(made) == list(PeerStatus.model_fields)  # what POST /v1/peerings/establish answers
        assert (made["name"], made["peer_trust_domain"], made["connected"]) == ("east", "east.mesh", None)
        gone = orjson.loads(cli_run("peer", "delete", "--dir", str(north.directory), "east", "-o", "json"))
        assert gone == {"name": "east", "deleted": False}  # north is not running: finished when it next starts

    summary = {
        zone.name: [(line["actor"], line["action"], line["target"]) for line in audit_lines(zone)]
        for zone in (east, west, north)
    }
    me = audit.cli_actor()
    assert summary == {
        "east": [(API_ACTOR, "peer.token", "peer west"), (me, "peer.token", "peer north")],
        "west": [(API_ACTOR, "peer.establish", "peer east"), (API_ACTOR, "peer.delete", "peer east")],
        "north": [(me, "peer.establish", "peer east"), (me, "peer.delete", "peer east")],
    }
    assert me.startswith("cli:")
    (establish, _) = audit_lines(west)
    assert (establish["zone"], establish["trust_domain"], establish["method"]) == ("east", "east.mesh", "POST")
    assert audit_lines(north)[0]["zone"] == "east"
    for zone in (east, west, north):
        raw = (zone.directory / audit.AUDIT_FILE).read_bytes()
        for line in audit_lines(zone):
            assert_when(line, since)
        for secret in (issued.json()["token"], cli_token, zone.admin_token(), zone.read_token()):
            assert secret.encode() not in raw, zone.name
        _assert_no_secrets(zone, raw)


def test_each_cli_mutation_is_one_line_and_reads_are_none(tmp_path: Path) -> None:
    since = dt.datetime.now(dt.UTC)
    directory = str(tmp_path / "east")
    cli_run("zone", "init", "--dir", directory, "--name", "east", "--trust-domain", "east.mesh")
    zone = Zone.open(Path(directory))
    assert len(audit_lines(zone)) == 1
    cli_run(
        "service", "register", "--dir", directory, "--name", "web", "--port", "http=8080", "--endpoint", "10.0.0.5:8080"
    )
    cli_run("export", "add", "--dir", directory, "--service", "web", "--to", "west", "--to", "north")
    cli_run("export", "remove", "--dir", directory, "--service", "web", "--to", "north")
    cli_run("service", "deregister", "--dir", directory, "--name", "web")
    token = cli_run("peer", "token", "--dir", directory, "--peer", "west", "--address", "127.0.0.1:15441").strip()
    before_reads = audit_lines(zone)
    for command, flags in (
        (("export", "list"), ()),
        (("service", "list"), ()),
        (("catalog", "list"), ()),
        (("peer", "list"), ()),
        (("zone", "token"), ("--read",)),
        (("zone", "token"), ("--admin", "-o", "json")),
    ):
        cli_run(*command, "--dir", directory, *flags)
    assert audit_lines(zone) == before_reads

    me = audit.cli_actor()
    assert [(line["actor"], line["action"], line["target"]) for line in before_reads] == [
        (me, "zone.init", "zone east"),
        (me, "service.register", "web.default"),
        (me, "export.add", "web.default"),
        (me, "export.remove", "web.default"),
        (me, "service.deregister", "web.default"),
        (me, "peer.token", "peer west"),
    ]
    init, register, added, removed, _, issued = before_reads
    assert (init["trust_domain"], init["catalog"]) == ("east.mesh", "embedded")
    assert register["endpoints"] == 1
    assert added["to"] == ["north", "west"]
    assert (removed["to"], removed["removed"]) == (["north"], 1)
    assert issued["addresses"] == ["127.0.0.1:15441"]
    for line in before_reads:
        assert_when(line, since)
    raw = (zone.directory / audit.AUDIT_FILE).read_bytes()
    for secret in (token, zone.admin_token(), zone.read_token()):
        assert secret.encode() not in raw
    _assert_no_secrets(zone, raw)
