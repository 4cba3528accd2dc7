"""``POST /v1/services`` and ``DELETE /v1/services/{namespace}/{name}``: the embedded catalog over the API.

A real zone behind its real API (controller, gateway, peering on loopback).
The API refuses what ``meshfed service register`` refuses, with the same
words, because both validate one :class:`ServiceRegistration`; a Consul or
Kubernetes zone refuses both calls, since meshfed does not own that catalog.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from meshfed.api import create_app
from meshfed.catalog.settings import ConsulSettings
from meshfed.cli import app as cli
from meshfed.controller import Controller, ControllerSettings
from meshfed.runtime import assemble_zone
from meshfed.zone import Zone
from tests.conftest import eventually
from tests.test_audit import LOOPBACK, audit_lines, bearer

WEB: dict[str, Any] = {
    "name": "web",
    "namespace": "shop",
    "ports": [{"name": "http", "port": 8080}, {"name": "admin", "port": 9090}],
    "labels": {"team": "store"},
    "endpoints": [
        {"address": "127.0.0.1", "port": 8080, "labels": {"version": "v1"}},
        {"address": "127.0.0.2", "port": 8080, "weight": 3, "locality": {"region": "eu"}, "labels": {"version": "v2"}},
    ],
}


def test_register_and_deregister_through_the_api(make_zone) -> None:
    zone = make_zone("east")
    admin, reader = bearer(zone.admin_token()), bearer(zone.read_token())
    with TestClient(assemble_zone(zone, LOOPBACK).app()) as api:
        assert api.post("/v1/services", json=WEB, headers=reader).status_code == 403
        created = api.post("/v1/services", json=WEB, headers=admin)
        assert created.status_code == 201, created.text
        assert created.json() == {"service": "web", "namespace": "shop", "catalog_version": 1}

        def served() -> list[dict[str, Any]]:
            services: list[dict[str, Any]] = api.get("/v1/catalog", headers=reader).json()["services"]
            return services

        # The running zone picks the change up from the catalog it watches.
        asyncio.run(eventually(lambda: bool(served()), "the running zone sees web"))
        (web,) = served()
        assert web["ports"] == {"http": 8080, "admin": 9090}
        assert [(e["address"], e["weight"], e["zone"], e["locality"]["region"]) for e in web["endpoints"]] == [
            ("127.0.0.1", 1, "east", ""),
            ("127.0.0.2", 3, "east", "eu"),
        ]

        deleted = api.delete("/v1/services/shop/web", headers=admin)
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["catalog_version"] == 2
        missing = api.delete("/v1/services/shop/web", headers=admin)
        assert missing.status_code == 404
        assert "no service web.shop" in missing.json()["detail"]
        asyncio.run(eventually(lambda: not served(), "the running zone sees web gone"))
    actions = [(line["action"], line["target"]) for line in audit_lines(zone)]
    assert actions == [("service.register", "web.shop"), ("service.deregister", "web.shop")]
    assert {line["actor"] for line in audit_lines(zone)} == {"api:admin@testclient"}


@pytest.mark.parametrize(
    ("change", "loc", "message", "flags"),
    [
        (
            {"ports": [{"name": "http", "port": 8080}, {"name": "http", "port": 9090}]},
            ["body", "ports"],
            "port name 'http' is given twice",
            ["--port", "http=8080", "--port", "http=9090", "--endpoint", "127.0.0.1:8080"],
        ),
        (
            {"endpoints": [{"address": "127.0.0.1", "port": 8080}, {"address": "127.0.0.1", "port": 8080}]},
            ["body", "endpoints"],
            "endpoint 127.0.0.1:8080 is given twice",
            ["--port", "http=8080", "--endpoint", "127.0.0.1:8080", "--endpoint", "127.0.0.1:8080"],
        ),
        (
            {"namespace": "BAD NS"},
            ["body", "namespace"],
            "namespace 'BAD NS' must be a DNS label",
            ["--namespace", "BAD NS", "--port", "http=8080", "--endpoint", "127.0.0.1:8080"],
        ),
        (
            {"endpoints": [{"address": "web.example", "port": 8080}]},
            ["body", "endpoints", 0, "address"],
            "must be an IP address",
            ["--port", "http=8080", "--endpoint", "web.example:8080"],
        ),
    ],
)
def test_the_api_and_the_cli_refuse_the_same_registrations(
    make_zone, change: dict[str, Any], loc: list[Any], message: str, flags: list[str]
) -> None:
    zone = make_zone("east")
    with TestClient(assemble_zone(zone, LOOPBACK).app()) as api:
        refused = api.post("/v1/services", json={**WEB, **change}, headers=bearer(zone.admin_token()))
    assert refused.status_code == 422, refused.text
    (error,) = refused.json()["detail"]
    assert error["loc"] == loc
    assert message in error["msg"]
    result = CliRunner().invoke(cli, ["service", "register", "--dir", str(zone.directory), "--name", "web", *flags])
    assert result.exit_code != 0
    assert message in str(result.exception)
    assert not audit_lines(zone)


def test_a_consul_zone_refuses_both_calls(tmp_path: Path) -> None:
    zone = Zone.init(tmp_path / "east", "east", "east.mesh", catalog="consul", consul=ConsulSettings())
    # Not started: the refusal comes before anything would reach Consul.
    api = TestClient(
        create_app(Controller(zone, ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0)))
    )
    admin = bearer(zone.admin_token())
    for response in (
        api.post("/v1/services", json=WEB, headers=admin),
        api.delete("/v1/services/shop/web", headers=admin),
    ):
        assert response.status_code == 409, response.text
        detail = response.json()["detail"]
        assert "consul catalog, which meshfed does not own" in detail
        assert "manage them in Consul" in detail
    assert not audit_lines(zone)
