"""The Consul catalog source, against a real Consul with ACLs and against the Consul API double.

Every test a real Consul can run takes the ``consul`` fixture and runs twice:
``[double]`` (``tests/doubles/consul.py``) and ``[real]`` (``consul agent -dev``
with ``default_policy = "deny"``, started by ``tests/servers/run.py``). The
test body drives Consul through its HTTP API with the management token, and
runs meshfed with a token created from the policy operators are told to write,
``helm/meshfed/examples/consul-acl-policy.hcl``, so the docs cannot drift from
what works. The real Consul is shared by the whole session: every name a test
creates (services, nodes, zone, policies) carries a suffix of its own, and the
fixture removes them afterwards.

Double-only tests inject what a real Consul will not do on demand (an index
going backwards, 5xx, non-JSON), or need what the real server lacks (Consul
Enterprise namespaces; ``Service.Locality``, Consul 1.17+).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import socket
import time
import tomllib
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshfed.catalog import CatalogSnapshot, ConsulSettings, LocalImport, Service, open_catalog
from meshfed.catalog.consul import ConsulCatalog
from meshfed.catalog.consul_api import ACL_POLICY_FILE
from meshfed.catalog.consul_imports import MANAGED_META
from meshfed.errors import CatalogError, ZoneError
from meshfed.zone import Zone
from tests.conftest import eventually, until
from tests.doubles.consul import ConsulDouble
from tests.servers import REPO, real_consul

FAST = {"blocking_wait": 10.0, "initial_sync_timeout": 5.0, "backoff": (0.01, 0.05)}
POLICY = REPO / ACL_POLICY_FILE


def documented_policy(node: str, imports: list[str]) -> str:
    """The policy file for zone node ``node`` with one service block per import, as its comments tell operators."""
    text = POLICY.read_text()
    block = re.search(r'service "api-west" \{[^}]*\}\n', text)
    assert block is not None, f"{ACL_POLICY_FILE} no longer has the example import block: update this test with it"
    assert text.count('node "meshfed-east"') == 1, f"{ACL_POLICY_FILE} no longer names node meshfed-east"
    text = text.replace('node "meshfed-east"', f'node "{node}"')
    zone = node.removeprefix("meshfed-")
    assert text.count('key "meshfed/east/leader"') == 1, f"{ACL_POLICY_FILE} no longer names key meshfed/east/leader"
    text = text.replace('key "meshfed/east/leader"', f'key "meshfed/{zone}/leader"')
    state = 'key_prefix "meshfed/east/state/"'
    assert text.count(state) == 1, f"{ACL_POLICY_FILE} no longer names {state}"
    text = text.replace(state, f'key_prefix "meshfed/{zone}/state/"')
    return text.replace(block.group(0), "".join(block.group(0).replace("api-west", name) for name in imports))


class ConsulUnderTest:
    """One Consul, the double or the real server, changed through Consul's HTTP API with the management token."""

    def __init__(self, address: str, management_token: str, double: ConsulDouble | None = None) -> None:
        self.address = address
        self.double = double
        self.suffix = uuid.uuid4().hex[:8]
        self.zone = self.name("east")
        self.node = f"meshfed-{self.zone}"
        self._http = httpx.Client(base_url=address, headers={"X-Consul-Token": management_token}, timeout=10)
        self._tokens: list[str] = []
        self._policies: dict[str, str] = {}  # ID by name

    def name(self, base: str) -> str:
        """``base`` made unique to this test."""
        return f"{base}-{self.suffix}"

    def mine(self, snapshot: CatalogSnapshot) -> list[Service]:
        """The services this test registered (a shared real Consul holds others, such as ``consul``)."""
        return [service for service in snapshot.services if self.suffix in service.name]

    def request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return self._http.request(method, path, json=body)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        response = self.request(method, path, body)
        assert response.status_code == 200, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def register(
        self,
        name: str,
        address: str,
        port: int,
        *,
        node: str | None = None,
        node_address: str = "10.0.0.1",
        service_id: str | None = None,
        tags: list[str] | None = None,
        meta: dict[str, str] | None = None,
        status: str = "passing",
        **fields: Any,
    ) -> str:
        """Register an instance with one service check in ``status``; returns its service ID."""
        service_id = service_id or f"{name}-{port}"
        service = {"ID": service_id, "Service": name, "Address": address, "Port": port, "Tags": tags or []}
        service |= {"Meta": meta or {}, **fields}
        check = {"CheckID": f"service:{service_id}", "Name": f"{name} check", "Status": status, "ServiceID": service_id}
        node = node or self.name("node-1")
        self.call(
            "PUT",
            "/v1/catalog/register",
            {"Node": node, "Address": node_address, "Service": service, "Checks": [check]},
        )
        return service_id

    def set_check(self, service_id: str, status: str, node: str | None = None) -> None:
        check = {"CheckID": f"service:{service_id}", "Name": "check", "Status": status, "ServiceID": service_id}
        self.call(
            "PUT",
            "/v1/catalog/register",
            {"Node": node or self.name("node-1"), "SkipNodeUpdate": True, "Checks": [check]},
        )

    def deregister(self, service_id: str, node: str | None = None) -> None:
        self.call("PUT", "/v1/catalog/deregister", {"Node": node or self.name("node-1"), "ServiceID": service_id})

    def node_document(self, node: str) -> dict[str, Any]:
        document = self.call("GET", f"/v1/catalog/node/{node}")
        assert isinstance(document, dict), f"node {node} is not in Consul"
        return document

    def token_file(self, directory: Path, rules: str, label: str = "meshfed") -> Path:
        """A file holding the SecretID of a new token whose one policy is ``rules``."""
        name = self.name(f"{label}-{len(self._policies)}")
        self._policies[name] = self.call("PUT", "/v1/acl/policy", {"Name": name, "Rules": rules})["ID"]
        token = self.call("PUT", "/v1/acl/token", {"Description": name, "Policies": [{"Name": name}]})
        self._tokens.append(token["AccessorID"])
        path = directory / f"{name}.token"
        path.write_text(f"{token['SecretID']}\n")
        return path

    def meshfed_token(self, directory: Path, imports: list[str] | None = None) -> Path:
        """meshfed's token for this test's zone: the documented policy, with ``imports`` (Consul service names)."""
        return self.token_file(directory, documented_policy(self.node, imports or []))

    def update_policy(self, token_file: Path, rules: str) -> None:
        name = token_file.name.removesuffix(".token")
        self.call("PUT", f"/v1/acl/policy/{self._policies[name]}", {"Name": name, "Rules": rules})

    def cleanup(self) -> None:
        for node in self.call("GET", "/v1/catalog/nodes"):
            if self.suffix in node["Node"]:
                self.call("PUT", "/v1/catalog/deregister", {"Node": node["Node"]})
        for accessor in self._tokens:
            self.call("DELETE", f"/v1/acl/token/{accessor}")
        for policy_id in self._policies.values():
            self.call("DELETE", f"/v1/acl/policy/{policy_id}")
        self._http.close()


@pytest.fixture(params=["double", "real"])
def consul(request: pytest.FixtureRequest) -> Iterator[ConsulUnderTest]:
    if request.param == "double":
        management = str(uuid.uuid4())
        with ConsulDouble(management_token=management) as double:
            under_test = ConsulUnderTest(double.address, management, double)
            yield under_test
            under_test.cleanup()
    else:
        real = real_consul()
        under_test = ConsulUnderTest(real.address, real.management_token)
        yield under_test
        under_test.cleanup()


@pytest.fixture
def consul_double() -> Iterator[ConsulDouble]:
    """A double without ACLs, for the faults a real Consul will not produce on demand."""
    with ConsulDouble() as double:
        yield double


def source(consul: ConsulUnderTest | ConsulDouble, token_file: Path | None = None, **options: Any) -> ConsulCatalog:
    settings = {key: options.pop(key) for key in ("namespace", "datacenter") if key in options}
    zone = consul.zone if isinstance(consul, ConsulUnderTest) else "east"
    return ConsulCatalog(
        ConsulSettings(address=consul.address, token_file=str(token_file) if token_file else None, **settings),
        zone=zone,
        **{**FAST, **options},
    )


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def health(snapshot: CatalogSnapshot, name: str) -> list[bool]:
    """Whether each endpoint of service ``name`` (namespace default) is healthy; [] while it is not listed."""
    service = snapshot.service("default", name)
    return [endpoint.healthy for endpoint in service.endpoints] if service is not None else []


# -- against the double and the real server -------------------------------------------------------------


def test_lists_services_with_health_labels_and_node_addresses(consul: ConsulUnderTest, tmp_path: Path) -> None:
    web = consul.name("web")
    consul.register(
        web, "10.1.0.5", 8080, tags=["version=v2", "primary"], meta={"team": "shop", "meshfed-port-name": "http"}
    )
    consul.register(web, "", 8081, node=consul.name("node-2"), node_address="10.1.0.6", status="critical")
    consul.register(consul.name("Bad_Name"), "10.3.0.1", 1)  # Consul takes it; meshfed cannot represent it
    token = consul.meshfed_token(tmp_path)

    async def scenario() -> None:
        catalog = source(consul, token)
        try:
            snapshot = await catalog.snapshot()
            assert catalog.last_error is None, "the documented policy must let meshfed see everything"
        finally:
            await catalog.aclose()
        assert [service.key for service in consul.mine(snapshot)] == [("default", web)]
        service = snapshot.service("default", web)
        assert service is not None
        assert service.ports == {"http": 8080}
        first, second = service.endpoints
        assert (first.address, first.port, first.healthy) == ("10.1.0.5", 8080, True)
        assert first.labels == {"version": "v2", "team": "shop"}
        # No Service.Address: the node's address; a critical check makes it unhealthy.
        assert (second.address, second.port, second.healthy) == ("10.1.0.6", 8081, False)

    run(scenario)


def test_watch_wakes_on_change_through_blocking_queries(consul: ConsulUnderTest, tmp_path: Path) -> None:
    web, api = consul.name("web"), consul.name("api")
    web_id = consul.register(web, "10.1.0.5", 8080)
    token = consul.meshfed_token(tmp_path)

    async def scenario() -> None:
        catalog = source(consul, token)
        try:
            first = await catalog.snapshot()
            # Nothing changes: watch times out with the same version.
            assert (await catalog.watch(first.version, 0.3)).version == first.version
            started = time.monotonic()
            consul.set_check(web_id, "critical")
            changed = await until(catalog, lambda s: health(s, web) == [False])
            assert time.monotonic() - started < 2.0, "a blocking query should return as soon as the index moves"
            assert changed.version > first.version

            consul.register(api, "10.1.0.9", 9090)
            added = await until(catalog, lambda s: s.service("default", api) is not None)
            consul.deregister(web_id)
            removed = await until(catalog, lambda s: s.service("default", web) is None)
            assert removed.version > added.version > changed.version
        finally:
            await catalog.aclose()
        if consul.double is not None:  # only the double shows the queries themselves: blocking ones
            blocking = [query for _, path, query in consul.double.requests if path == f"/v1/health/service/{web}"]
            assert any("index" in query and query.get("wait") == "10000ms" for query in blocking)

    run(scenario)


def test_publish_imports_registers_them_on_the_zone_node_and_removes_stale_ones(
    consul: ConsulUnderTest, tmp_path: Path
) -> None:
    web, api, db = consul.name("web"), consul.name("api"), consul.name("db")
    consul.register(web, "10.1.0.5", 8080)
    # Left by an earlier run of this zone: meshfed-managed, no longer imported.
    consul.register(
        consul.name("old") + "-west",
        "127.0.0.1",
        15999,
        node=consul.node,
        node_address="127.0.0.1",
        service_id=f"meshfed-{consul.name('old')}.default.west",
        meta={MANAGED_META: "true"},
    )
    imports = [
        LocalImport(peer="west", service=api, namespace="default", ports={"http": ("127.0.0.1", 15001)}),
        LocalImport(
            peer="north",
            service=db,
            namespace="data",
            ports={"sql": ("127.0.0.1", 15002), "admin": ("127.0.0.1", 15003)},
        ),
    ]
    token = consul.meshfed_token(tmp_path, [f"{api}-west", f"{db}-data-north"])

    async def scenario() -> None:
        catalog = source(consul, token)
        try:
            await catalog.publish_imports(imports)
            document = consul.node_document(consul.node)
            # The node says what it is (consul-esm and consul-k8s read this); Consul keeps only what the body carried.
            assert document["Node"]["Meta"] == {
                MANAGED_META: "true",
                "external-node": "true",
                "external-probe": "false",
            }
            registered = document["Services"]
            assert sorted(service["Service"] for service in registered.values()) == [f"{api}-west", f"{db}-data-north"]
            api_entry = registered[f"meshfed-{api}.default.west"]
            assert (api_entry["Address"], api_entry["Port"]) == ("127.0.0.1", 15001)
            assert api_entry["Meta"][MANAGED_META] == "true"
            assert api_entry["Meta"]["meshfed-import"] == f"{api}.default.west"
            db_entry = registered[f"meshfed-{db}.data.north"]
            assert (db_entry["Port"], db_entry["Meta"]["meshfed-port-name"], db_entry["Meta"]["meshfed-port-sql"]) == (
                15003,
                "admin",
                "15002",
            )

            # Unchanged: nothing is rewritten (Consul would move the ModifyIndex).
            await catalog.publish_imports(imports)
            again = consul.node_document(consul.node)
            assert {sid: s["ModifyIndex"] for sid, s in again["Services"].items()} == {
                sid: s["ModifyIndex"] for sid, s in registered.items()
            }

            await catalog.publish_imports(imports[:1])
            assert list(consul.node_document(consul.node)["Services"]) == [f"meshfed-{api}.default.west"]
        finally:
            await catalog.aclose()

        # Imports are in Consul, but never listed as the zone's own services: a fresh listing shows web only.
        fresh = source(consul, token)
        try:
            assert [service.name for service in consul.mine(await fresh.snapshot())] == [web]
            await fresh.publish_imports([])
            assert consul.node_document(consul.node)["Services"] == {}
            assert consul.node_document(consul.name("node-1"))["Services"]  # what meshfed does not own stays
        finally:
            await fresh.aclose()

    run(scenario)


def test_acl_filtered_reads_are_reported_once_and_clear_when_the_policy_is_fixed(
    consul: ConsulUnderTest, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    web, api = consul.name("web"), consul.name("api")
    consul.register(web, "10.1.0.5", 8080)
    consul.register(api, "10.1.0.9", 9090, node=consul.name("node-2"))
    # Service reads without node reads: Consul lists the services, but leaves out their instances.
    token = consul.token_file(tmp_path, 'service_prefix "" { policy = "read" }')

    async def scenario() -> None:
        catalog = source(consul, token, blocking_wait=0.5)
        try:
            snapshot = await catalog.snapshot()
            assert consul.mine(snapshot) == []
            assert catalog.last_error is not None
            assert "hides instances on nodes" in catalog.last_error
            assert 'node_prefix "" read' in catalog.last_error
            assert ACL_POLICY_FILE in catalog.last_error
            assert str(token) in catalog.last_error

            consul.update_policy(token, documented_policy(consul.node, []))
            healed = await until(catalog, lambda s: len(consul.mine(s)) == 2, timeout=10)
            assert [service.name for service in consul.mine(healed)] == sorted([web, api])
            await eventually(lambda: catalog.last_error is None, "the filtering report to clear")
            assert any("hides instances" in error for error in catalog.recent_errors)
        finally:
            await catalog.aclose()
        # Two services (and more on a shared Consul) hidden the same way, polled again and again: one log line.
        hidden = [record.getMessage() for record in caplog.records if "hides instances" in record.getMessage()]
        assert len(hidden) == 1, hidden

        # Node reads without service reads: Consul leaves the services out of the listing itself.
        blind = source(consul, consul.token_file(tmp_path, 'node_prefix "" { policy = "read" }'))
        try:
            assert consul.mine(await blind.snapshot()) == []
            assert blind.last_error is not None
            assert "hides services" in blind.last_error
            assert 'service_prefix "" read' in blind.last_error
        finally:
            await blind.aclose()

    with caplog.at_level(logging.WARNING, logger="meshfed.catalog"):
        run(scenario)


def test_registration_denied_names_the_acl_rule_to_add(consul: ConsulUnderTest, tmp_path: Path) -> None:
    api = consul.name("api")
    imports = [LocalImport(peer="west", service=api, namespace="default", ports={"http": ("127.0.0.1", 15001)})]
    # The documented policy without a block for this import.
    token = consul.meshfed_token(tmp_path, [])
    # And one for another zone's node.
    other_zone = consul.token_file(tmp_path, documented_policy(f"meshfed-{consul.name('west')}", [f"{api}-west"]))

    async def scenario() -> None:
        catalog = source(consul, token)
        try:
            with pytest.raises(CatalogError) as raised:
                await catalog.publish_imports(imports)
            message = str(raised.value)
            assert message.startswith(f"cannot register imports: Consul at {consul.address} denied access (403 ")
            assert f'lacks service:write on "{api}-west"' in message
            assert f'add `service "{api}-west" {{ policy = "write" }}` to its policy (see {ACL_POLICY_FILE})' in message
            assert str(token) in message
        finally:
            await catalog.aclose()
        catalog = source(consul, other_zone)
        try:
            with pytest.raises(CatalogError, match=re.escape(f'add `node "{consul.node}" {{ policy = "write" }}`')):
                await catalog.publish_imports(imports)
        finally:
            await catalog.aclose()

    run(scenario)


def test_an_unknown_token_says_what_to_check(consul: ConsulUnderTest, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(f"{uuid.uuid4()}\n")

    async def scenario() -> None:
        catalog = source(consul, token, initial_sync_timeout=1.0)
        try:
            with pytest.raises(CatalogError) as raised:
                await catalog.snapshot()
            assert f"does not know the ACL token in {token} (403 ACL not found)" in str(raised.value)
            assert "is it the SecretID of a token that exists in this datacenter?" in str(raised.value)
        finally:
            await catalog.aclose()

    run(scenario)


def test_without_a_token_meshfed_warns_that_consul_hides_what_anonymous_cannot_read(
    consul: ConsulUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    web = consul.name("web")
    consul.register(web, "10.1.0.5", 8080)

    async def scenario() -> None:
        catalog = source(consul)
        try:
            # Consul filters the anonymous token's reads without saying so (no X-Consul-Results-Filtered-By-Acls).
            assert consul.mine(await catalog.snapshot()) == []
            with pytest.raises(CatalogError) as raised:
                await catalog.publish_imports(
                    [LocalImport(peer="west", service=web, namespace="default", ports={"http": ("127.0.0.1", 1)})]
                )
            assert "zone.toml names no [consul] token_file" in str(raised.value)
            assert f"create a token with the policy in {ACL_POLICY_FILE}" in str(raised.value)
        finally:
            await catalog.aclose()

    with caplog.at_level(logging.WARNING, logger="meshfed.catalog"):
        run(scenario)
    warnings = [record.getMessage() for record in caplog.records if "default policy deny" in record.getMessage()]
    assert len(warnings) == 1
    assert "names no [consul] token_file" in warnings[0]


def test_register_and_deregister_send_consul_what_it_decodes(consul: ConsulUnderTest) -> None:
    # What py-consul's catalog.register and deregister send with a token; Consul decodes strictly and refuses it.
    writes = {
        "/v1/catalog/register": {"node": consul.node, "address": "127.0.0.1", "WriteRequest": {"Token": "x"}},
        "/v1/catalog/deregister": {"node": consul.node, "WriteRequest": {"Token": "x"}},
    }
    for path, body in writes.items():
        response = consul.request("PUT", path, body)
        assert (response.status_code, response.text) == (
            400,
            'Request decode failed: json: unknown field "WriteRequest"',
        )


# -- double only: what the real server will not do on demand, or lacks ------------------------------------


def test_enterprise_namespaces_and_locality() -> None:
    # Without ACLs: Enterprise namespace rules are not what this tests.
    with ConsulDouble(enterprise=True) as double:
        consul = ConsulUnderTest(double.address, "", double)
        web, billing = consul.name("web"), consul.name("billing")
        consul.register(web, "10.1.0.5", 8080, Locality={"Region": "eu-west-1", "Zone": "eu-west-1a"})
        consul.register(billing, "10.2.0.1", 9000, Namespace="finance")

        async def scenario() -> None:
            default_namespace = source(consul, token_file=None)
            finance = source(consul, token_file=None, namespace="finance")
            try:
                default = await default_namespace.snapshot()
                assert [service.key for service in default.services] == [("default", web)]
                (endpoint,) = default.services[0].endpoints
                assert (endpoint.locality.region, endpoint.locality.zone) == ("eu-west-1", "eu-west-1a")
                assert [service.key for service in (await finance.snapshot()).services] == [("finance", billing)]
            finally:
                await default_namespace.aclose()
                await finance.aclose()

        run(scenario)


def test_an_index_going_backwards_restarts_from_scratch(consul_double: ConsulDouble) -> None:
    consul_double.register("web", "10.1.0.5", 8080)

    async def scenario() -> None:
        catalog = source(consul_double)
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


def test_bad_responses_keep_the_last_good_snapshot_and_say_what_happened(consul_double: ConsulDouble) -> None:
    consul_double.register("web", "10.1.0.5", 8080)

    async def scenario() -> None:
        catalog = source(consul_double)
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


def test_a_failing_query_is_logged_once_while_other_queries_answer(
    consul_double: ConsulDouble, caplog: pytest.LogCaptureFixture
) -> None:
    consul_double.register("web", "10.1.0.5", 8080)
    consul_double.register("api", "10.1.0.9", 9090)

    async def scenario() -> None:
        catalog = source(consul_double)
        try:
            first = await catalog.snapshot()
            # api's query keeps failing (far longer than the test runs) while web's answers again and again.
            consul_double.fail_next(100_000, 500, "rpc error: injected for api", path="/v1/health/service/api")
            consul_double.set_check("api-9090", "critical")
            await eventually(lambda: catalog.last_error is not None and "injected for api" in catalog.last_error)
            snapshot = first
            for healthy in (False, True, False, True):
                consul_double.set_check("web-8080", "passing" if healthy else "critical")
                snapshot = await until(catalog, lambda s, healthy=healthy: health(s, "web") == [healthy])  # type: ignore[misc]
                assert catalog.last_error is not None, "web answering must not hide that api still fails"
            assert len(health(snapshot, "api")) == 1  # api keeps its last good answer
        finally:
            await catalog.aclose()

    with caplog.at_level(logging.INFO, logger="meshfed.catalog"):
        run(scenario)
    messages = [record.getMessage() for record in caplog.records]
    assert len([message for message in messages if "injected for api" in message]) == 1, messages
    assert not [message for message in messages if "reachable again" in message], messages


# -- no server needed ----------------------------------------------------------------------------------------


def test_unreachable_consul_and_a_missing_token_file_say_what_to_check(tmp_path: Path) -> None:
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


def test_the_readme_and_the_helm_example_name_the_acl_policy_file() -> None:
    assert POLICY.is_file()
    assert f"`{ACL_POLICY_FILE}`" in (REPO / "README.md").read_text()
    assert "consul-acl-policy.hcl" in (REPO / "helm/meshfed/examples/consul.yaml").read_text()


def test_zone_config_and_cli_select_the_consul_catalog(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from meshfed.cli import app

    address = "http://127.0.0.1:8500"
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
            address,
            "--consul-datacenter",
            "dc1",
        ],
    )
    assert result.exit_code == 0, result.output
    config = tomllib.loads((tmp_path / "east" / "zone.toml").read_text())
    assert config["catalog"] == "consul"
    assert config["consul"] == {"address": address, "datacenter": "dc1"}
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
    toml = (tmp_path / "east" / "zone.toml").read_text().replace(address, "ftp://x")
    (tmp_path / "east" / "zone.toml").write_text(toml)
    with pytest.raises(ZoneError, match=r"consul.address: .*must look like http://HOST:PORT"):
        Zone.open(tmp_path / "east")
