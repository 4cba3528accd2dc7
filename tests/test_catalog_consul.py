"""The Consul catalog source, through py-consul, against the Consul API double (and a real Consul if one is set).

Run against a real agent: ``CONSUL_HTTP_ADDR=http://127.0.0.1:8500 pytest tests/test_catalog_consul.py -k real``
(``consul agent -dev`` is enough; with ACLs, also ``CONSUL_HTTP_TOKEN``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
import tomllib
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshfed.catalog import ConsulSettings, LocalImport, open_catalog
from meshfed.catalog.consul import MANAGED_META, ConsulCatalog
from meshfed.errors import CatalogError, ZoneError
from meshfed.zone import Zone
from tests.conftest import eventually, until
from tests.doubles.consul import ConsulDouble

FAST = {"blocking_wait": 10.0, "initial_sync_timeout": 5.0, "backoff": (0.01, 0.05)}


@pytest.fixture
def consul_double() -> Iterator[ConsulDouble]:
    with ConsulDouble() as double:
        yield double


def source(address: str, **settings: Any) -> ConsulCatalog:
    return ConsulCatalog(ConsulSettings(address=address, **settings), zone="east", **FAST)  # type: ignore[arg-type]


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def test_lists_services_with_health_labels_locality_and_namespaces(consul_double):
    consul_double.register(
        "web", "10.1.0.5", 8080, tags=["version=v2", "primary"], meta={"team": "shop", "meshfed-port-name": "http"}
    )
    consul_double.register(
        "web",
        "",
        8081,
        node="node-2",
        node_address="10.1.0.6",
        status="critical",
        locality={"Region": "eu-west-1", "Zone": "eu-west-1a"},
    )
    consul_double.register("billing", "10.2.0.1", 9000, namespace="finance")
    consul_double.register("Bad_Name", "10.3.0.1", 1)

    async def scenario() -> None:
        catalog = source(consul_double.address)
        try:
            snapshot = await catalog.snapshot()
        finally:
            await catalog.aclose()
        assert [service.key for service in snapshot.services] == [("default", "web"), ("finance", "billing")]
        web = snapshot.service("default", "web")
        assert web is not None
        assert web.ports == {"http": 8080}
        first, second = web.endpoints
        assert (first.address, first.port, first.healthy) == ("10.1.0.5", 8080, True)
        assert first.labels == {"version": "v2", "team": "shop"}
        # No Service.Address: the node's address; a critical check makes it unhealthy.
        assert (second.address, second.port, second.healthy) == ("10.1.0.6", 8081, False)
        assert (second.locality.region, second.locality.zone) == ("eu-west-1", "eu-west-1a")
        billing = snapshot.service("finance", "billing")
        assert billing is not None
        assert billing.ports == {"default": 9000}

    run(scenario)


def test_watch_wakes_on_change_through_blocking_queries(consul_double):
    consul_double.register("web", "10.1.0.5", 8080)

    async def scenario() -> None:
        catalog = source(consul_double.address)
        try:
            first = await catalog.snapshot()
            # Nothing changes: watch times out with the same version (and Consul is not polled in a loop).
            assert (await catalog.watch(first.version, 0.3)).version == first.version
            started = time.monotonic()
            consul_double.set_check("web-8080", "critical")
            changed = await catalog.watch(first.version, 5.0)
            assert time.monotonic() - started < 2.0, "a blocking query should return as soon as the index moves"
            assert changed.version > first.version
            assert [endpoint.healthy for endpoint in changed.services[0].endpoints] == [False]

            consul_double.register("api", "10.1.0.9", 9090)
            added = await until(catalog, lambda s: s.service("default", "api") is not None)
            consul_double.deregister("web-8080")
            removed = await until(catalog, lambda s: s.service("default", "web") is None)
            assert removed.version > added.version > changed.version
        finally:
            await catalog.aclose()
        blocking = [query for method, path, query in consul_double.requests if path == "/v1/health/service/web"]
        assert any("index" in query and query.get("wait") == "10000ms" for query in blocking)

    run(scenario)


def test_an_index_going_backwards_restarts_from_scratch(consul_double):
    consul_double.register("web", "10.1.0.5", 8080)

    async def scenario() -> None:
        catalog = source(consul_double.address)
        try:
            first = await catalog.snapshot()
            # A snapshot restore onto a rebuilt cluster: indexes restart low, and the contents change.
            consul_double.reset_index(to=2)
            consul_double.deregister("web-8080")
            consul_double.register("api", "10.1.0.9", 9090)
            after = await until(catalog, lambda s: [service.name for service in s.services] == ["api"])
            assert after.version > first.version
            # And it keeps following changes at the new, lower indexes.
            consul_double.register("web", "10.1.0.5", 8080)
            await until(catalog, lambda s: s.service("default", "web") is not None)
        finally:
            await catalog.aclose()
        indexes = [
            int(query["index"])
            for _, path, query in consul_double.requests
            if path == "/v1/catalog/services" and "index" in query
        ]
        assert any(later < earlier for earlier, later in itertools.pairwise(indexes))

    run(scenario)


def test_publish_imports_registers_them_and_removes_stale_ones(consul_double):
    consul_double.register("web", "10.1.0.5", 8080)
    # Left by an earlier run of this zone: meshfed-managed, no longer imported.
    consul_double.register(
        "old-west",
        "127.0.0.1",
        15999,
        node="meshfed-east",
        service_id="meshfed-old.default.west",
        meta={MANAGED_META: "true"},
    )
    imports = [
        LocalImport(peer="west", service="api", namespace="default", ports={"http": ("127.0.0.1", 15001)}),
        LocalImport(
            peer="north",
            service="db",
            namespace="data",
            ports={"sql": ("127.0.0.1", 15002), "admin": ("127.0.0.1", 15003)},
        ),
    ]

    async def scenario() -> None:
        catalog = source(consul_double.address)
        try:
            await catalog.snapshot()
            await catalog.publish_imports(imports)
            registered = consul_double.registered("meshfed-east")
            assert sorted(service["Service"] for service in registered.values()) == ["api-west", "db-data-north"]
            api = registered["meshfed-api.default.west"]
            assert (api["Address"], api["Port"]) == ("127.0.0.1", 15001)
            assert api["Meta"][MANAGED_META] == "true"
            assert api["Meta"]["meshfed-import"] == "api.default.west"
            db = registered["meshfed-db.data.north"]
            assert (db["Port"], db["Meta"]["meshfed-port-name"], db["Meta"]["meshfed-port-sql"]) == (
                15003,
                "admin",
                "15002",
            )
            # Imports are in Consul, but never listed as this zone's own services.
            await asyncio.sleep(0.3)
            snapshot = await catalog.watch(0, 0.1)
            assert [service.name for service in snapshot.services] == ["web"]

            writes = len([r for r in consul_double.requests if r[0] == "PUT"])
            await catalog.publish_imports(imports)  # unchanged: nothing rewritten
            assert len([r for r in consul_double.requests if r[0] == "PUT"]) == writes

            await catalog.publish_imports(imports[:1])
            assert list(consul_double.registered("meshfed-east")) == ["meshfed-api.default.west"]
            await catalog.publish_imports([])
            assert consul_double.registered("meshfed-east") == {}
            assert consul_double.registered("node-1")  # what meshfed does not own stays
        finally:
            await catalog.aclose()

    run(scenario)


def test_bad_responses_keep_the_last_good_snapshot_and_say_what_happened(consul_double):
    consul_double.register("web", "10.1.0.5", 8080)

    async def scenario() -> None:
        catalog = source(consul_double.address)
        try:
            good = await catalog.snapshot()
            consul_double.fail_next(4, 500, "rpc error making call: No cluster leader")
            consul_double.register("api", "10.1.0.9", 9090)
            await eventually(lambda: any("No cluster leader" in error for error in catalog.recent_errors))
            assert all(error.startswith(f"Consul at {consul_double.address}") for error in catalog.recent_errors)
            consul_double.fail_next(4, 200, "<html>captive portal</html>")
            consul_double.register("api", "10.1.0.9", 9091)
            await eventually(lambda: any("not JSON" in error for error in catalog.recent_errors))
            assert "is that address a Consul HTTP API?" in catalog.recent_errors[-1]
            # Meanwhile the last good snapshot (or newer good ones) keeps serving.
            assert (await catalog.watch(0, 0.1)).service("default", "web") is not None
            recovered = await until(catalog, lambda s: s.service("default", "api") is not None)
            assert recovered.version > good.version
            await eventually(lambda: catalog.last_error is None)
        finally:
            await catalog.aclose()

    run(scenario)


def test_acl_denied_and_unreachable_consul_give_errors_that_say_what_to_check(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("wrong-token\n")
    with ConsulDouble(acl_token="s3cret") as double:
        double.register("web", "10.1.0.5", 8080)

        async def denied() -> None:
            catalog = ConsulCatalog(
                ConsulSettings(address=double.address, token_file=str(token_file)),
                zone="east",
                blocking_wait=1.0,
                initial_sync_timeout=1.0,
                backoff=(0.01, 0.05),
            )
            try:
                with pytest.raises(CatalogError, match=r"denied access.*ACL token") as raised:
                    await catalog.snapshot()
                assert str(token_file) in str(raised.value)
            finally:
                await catalog.aclose()

        run(denied)
        token_file.write_text("s3cret\n")

        async def allowed() -> None:
            catalog = source(double.address, token_file=str(token_file))
            try:
                assert [service.name for service in (await catalog.snapshot()).services] == ["web"]
            finally:
                await catalog.aclose()

        run(allowed)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]

    async def unreachable() -> None:
        catalog = ConsulCatalog(
            ConsulSettings(address=f"http://127.0.0.1:{closed_port}"),
            zone="east",
            initial_sync_timeout=0.5,
            backoff=(0.01, 0.05),
        )
        try:
            with pytest.raises(CatalogError, match=r"refused the connection.*is \[consul\] address in zone.toml right"):
                await catalog.snapshot()
        finally:
            await catalog.aclose()

    run(unreachable)
    with pytest.raises(CatalogError, match="cannot read the Consul ACL token file"):
        ConsulCatalog(ConsulSettings(token_file=str(tmp_path / "missing")), zone="east")


def test_zone_config_and_cli_select_the_consul_catalog(tmp_path, consul_double):
    from typer.testing import CliRunner

    from meshfed.cli import app

    result = CliRunner().invoke(
        app,
        [
            "zone",
            "init",
            "--dir",
            str(tmp_path / "east"),
            "--name",
            "east",
            "--trust-domain",
            "east.mesh",
            "--catalog",
            "consul",
            "--consul-address",
            consul_double.address,
            "--consul-datacenter",
            "dc1",
        ],
    )
    assert result.exit_code == 0, result.output
    config = tomllib.loads((tmp_path / "east" / "zone.toml").read_text())
    assert config["catalog"] == "consul"
    assert config["consul"] == {"address": consul_double.address, "datacenter": "dc1"}
    zone = Zone.open(tmp_path / "east")
    catalog = open_catalog(zone)
    assert isinstance(catalog, ConsulCatalog)
    assert catalog.node == "meshfed-east"
    run(catalog.aclose)

    bad = CliRunner().invoke(
        app,
        [
            "zone",
            "init",
            "--dir",
            str(tmp_path / "west"),
            "--name",
            "west",
            "--trust-domain",
            "west.mesh",
            "--consul-address",
            "http://x:1",
        ],
    )
    assert bad.exit_code != 0
    assert isinstance(bad.exception, ZoneError)
    assert "need --catalog consul" in str(bad.exception)
    toml = (tmp_path / "east" / "zone.toml").read_text().replace(consul_double.address, "ftp://x")
    (tmp_path / "east" / "zone.toml").write_text(toml)
    with pytest.raises(ZoneError, match=r"consul.address: .*must look like http://HOST:PORT"):
        Zone.open(tmp_path / "east")


@pytest.mark.skipif(not os.environ.get("CONSUL_HTTP_ADDR"), reason="needs a real Consul: set CONSUL_HTTP_ADDR")
def test_real_consul_lists_watches_and_publishes(tmp_path: Path):
    import consul as py_consul

    address = os.environ["CONSUL_HTTP_ADDR"]
    if "//" not in address:
        address = f"http://{address}"
    token = os.environ.get("CONSUL_HTTP_TOKEN")
    token_file = None
    if token:
        (tmp_path / "token").write_text(token)
        token_file = str(tmp_path / "token")
    name = f"meshfed-test-{uuid.uuid4().hex[:8]}"
    zone = f"t{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        catalog = ConsulCatalog(ConsulSettings(address=address, token_file=token_file), zone=zone, **FAST)  # type: ignore[arg-type]
        agent = py_consul.Consul(host=address.split("//")[1].split(":")[0], port=int(address.rsplit(":", 1)[1]))
        try:
            first = await catalog.snapshot()
            await asyncio.to_thread(
                agent.agent.service.register, name, service_id=name, address="10.9.9.9", port=8080, tags=["version=v1"]
            )
            seen = await until(catalog, lambda s: s.service("default", name) is not None, timeout=15)
            assert seen.version > first.version
            await catalog.publish_imports(
                [LocalImport(peer="west", service=name, namespace="default", ports={"tcp": ("127.0.0.1", 15001)})]
            )
            _, nodes = await asyncio.to_thread(agent.catalog.service, f"{name}-west")
            assert [node["ServicePort"] for node in nodes] == [15001]
            await catalog.publish_imports([])
            _, nodes = await asyncio.to_thread(agent.catalog.service, f"{name}-west")
            assert nodes == []
        finally:
            await asyncio.to_thread(agent.agent.service.deregister, name)
            await asyncio.to_thread(agent.catalog.deregister, f"meshfed-{zone}")
            await catalog.aclose()

    run(scenario)
