"""A running zone applies ``[failover]``, ``[[split]]`` and ``[[authz]]`` when ``zone.toml`` changes.

A real controller (Rust gateway on loopback) watching its real zone
directory; the file is edited as an operator would, and the test waits (with
``eventually``) for what the running gateway serves to follow. An edit that
does not parse or validate is logged and changes nothing; settings that apply
only at start are logged as waiting for a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tomllib
from typing import Any

import pytest
import tomli_w

from meshfed.catalog import EmbeddedCatalog, Endpoint, Service
from meshfed.controller import Controller, ControllerSettings
from meshfed.federation.authz import AuthzRules
from meshfed.federation.exchange import ExportedService, ServiceSnapshot
from meshfed.federation.exports import ExportRules
from meshfed.gateway.config import TerminateListener
from meshfed.zone import Zone
from tests.conftest import eventually, trust_each_other


def edit(zone: Zone, **tables: Any) -> None:
    path = zone.directory / "zone.toml"
    document = tomllib.loads(path.read_text())
    document.update(tables)
    path.write_text(tomli_w.dumps(document))


def peer_exports(peer: str) -> ServiceSnapshot:
    return ServiceSnapshot(
        zone=peer,
        trust_domain=f"{peer}.mesh",
        gateway_addresses=["127.0.0.1:9"],
        version=1,
        services=[
            ExportedService(name="db", namespace="default", ports={"tcp": 7}, healthy_endpoints=1, total_endpoints=1)
        ],
    )


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == "meshfed.controller"]


def applied_changes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in messages(caplog, logging.INFO) if "applied" in m and "zone.toml" in m]


def test_failover_split_and_authz_apply_live_and_bad_edits_change_nothing(
    make_zone, caplog: pytest.LogCaptureFixture
) -> None:
    east, west, north = make_zone("east"), make_zone("west"), make_zone("north")
    trust_each_other(east, west, north)
    with EmbeddedCatalog(east.directory) as catalog:
        catalog.register(
            Service(
                name="db",
                ports={"tcp": 7},
                endpoints=[Endpoint(address="127.0.0.1", port=7001, zone="east")],
            )
        )
        catalog.register(
            Service(
                name="web",
                ports={"http": 8080},
                endpoints=[
                    Endpoint(address="127.0.0.1", port=8001, zone="east", labels={"version": "v1"}),
                    Endpoint(address="127.0.0.1", port=8002, zone="east", labels={"version": "v2"}),
                ],
            )
        )
    with ExportRules(east.directory) as rules:
        rules.add("web", "default", ["west"])

    def applied() -> list[str]:
        return applied_changes(caplog)

    async def scenario() -> None:
        controller = Controller(
            east,
            ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0, health_check=None),
            peer_trust_domains=lambda: {"west": west.trust_domain, "north": north.trust_domain},
        )
        async with controller:
            await controller.import_snapshot("west", peer_exports("west"))
            await controller.import_snapshot("north", peer_exports("north"))

            def sources() -> list[str]:
                (group,) = controller.failover_groups()
                return group.sources

            def web_route() -> dict[str, Any]:
                ingress = next(
                    listener
                    for listener in controller.gateway_config().listeners
                    if isinstance(listener, TerminateListener)
                )
                (route,) = [r for r in ingress.routes if ".web." in r.sni]
                shown: dict[str, Any] = dataclasses.asdict(route)
                return shown

            assert sources() == ["local", "north", "west"]  # peers by name, by default
            assert web_route()["cluster"] == "local:default/web"

            # [failover]: west first now.
            edit(east, failover={"order": ["west"], "split": {}})
            await eventually(lambda: sources() == ["local", "west", "north"], "the new failover order")
            assert controller.config.failover.order == ["west"]

            # [[split]]: web's peers' traffic divided 90/10 between its versions.
            edit(east, split=[{"service": "web", "label": "version", "weights": {"v1": 90, "v2": 10}}])
            await eventually(lambda: web_route()["weighted_clusters"] is not None, "web split by version")
            shares = {share["cluster"]: share["weight"] for share in web_route()["weighted_clusters"]}
            assert shares == {"local:default/web@version=v1": 90, "local:default/web@version=v2": 10}

            # [[authz]]: a rule of zone.toml, applied through the rules the gateway enforces.
            allowed = "spiffe://west.mesh/ns/default/*"
            edit(east, authz=[{"service": "web", "action": "allow", "id": allowed}])

            def config_rules() -> list[str]:
                with AuthzRules(east.directory) as rules:
                    return [rule.pattern for rule in rules.rules() if rule.source == "config"]

            await eventually(lambda: config_rules() == [allowed], "the zone.toml rule stored")
            await eventually(lambda: [r["id"] for r in web_route()["rules"]] == [allowed], "the rule enforced")

            # Invalid edits: logged with the field, and everything above stays.
            edit(east, failover={"order": ["Not A Peer"], "split": {}})
            await eventually(lambda: any("invalid" in m for m in messages(caplog, logging.ERROR)), "the refusal")
            (path := east.directory / "zone.toml").write_text(path.read_text() + "\n[failover\n")
            await eventually(lambda: any("does not parse" in m for m in messages(caplog, logging.ERROR)), "parse")
            assert sources() == ["local", "west", "north"]
            assert controller.config.failover.order == ["west"]
            assert web_route()["weighted_clusters"] is not None

            # What only applies at start: said so, and not applied.
            document = tomllib.loads(path.read_text().removesuffix("\n[failover\n"))
            path.write_text(tomli_w.dumps({**document, "gateway_address": "127.0.0.1:1", "failover": {"order": []}}))
            await eventually(lambda: sources() == ["local", "north", "west"], "the order back to names")
            await eventually(lambda: len(applied()) == 4, "the last change applied and logged")
            assert controller.config.gateway_address == "0.0.0.0:15443"

    with caplog.at_level(logging.INFO, logger="meshfed.controller"):
        asyncio.run(scenario())
    errors = messages(caplog, logging.ERROR)
    (invalid,) = [m for m in errors if "invalid" in m]
    assert "failover.order" in invalid
    assert "the running settings stay" in invalid
    tables = [m.split("]")[0].split("[")[1] for m in applied_changes(caplog)]
    assert tables == ["failover", "split", "authz", "failover"]
    (waiting,) = [m for m in messages(caplog, logging.WARNING) if "does not apply" in m]
    assert "gateway_address" in waiting
    assert "restart" in waiting
