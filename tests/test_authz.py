"""Authorization rules: stored in order, validated at the edge, and compiled into the ingress routes."""

from __future__ import annotations

import orjson
import pytest
from fastapi.testclient import TestClient

from meshfed.api import create_app
from meshfed.catalog.model import CatalogSnapshot, Endpoint, Service
from meshfed.controller import Controller, ControllerSettings
from meshfed.errors import FederationError
from meshfed.federation.authz import AuthzIndex, AuthzRules
from meshfed.federation.exchange import ExportedService, ServiceSnapshot
from meshfed.federation.exports import ExportIndex, ExportRule
from meshfed.federation.gateway_config import build_gateway_config
from meshfed.federation.imports import ImportedService, ImportOrigin
from meshfed.gateway import AuthzRule, OriginateListener, TerminateListener
from meshfed.gateway.handle import validate
from meshfed.gateway.sni import service_sni
from meshfed.policy.authz import RuleSpec, pattern_matches
from meshfed.policy.egress import EgressPolicy, ImportOverride
from meshfed.trust.bundle import bundle_roots_pem
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import Zone
from tests.conftest import gateway_identity
from tests.test_cli import _assert_one_line_error as assert_one_line_error
from tests.test_cli import meshfed_cli

WEST = TrustDomain("west.mesh")


def spec(action: str, pattern: str, **extra: object) -> RuleSpec:
    return RuleSpec.model_validate({"service": "orders", "namespace": "shop", "action": action, "id": pattern, **extra})


def test_rules_keep_their_order_and_positions(tmp_path):
    with AuthzRules(tmp_path) as rules:
        first = rules.add(spec("allow", "spiffe://west.mesh/ns/shop/*"))
        last = rules.add(spec("deny", "*"))
        inserted = rules.add(spec("deny", "spiffe://west.mesh/ns/shop/sa/intruder"), position=1)
        assert [r.rule_id for r in rules.rules()] == [inserted.rule_id, first.rule_id, last.rule_id]
        with pytest.raises(FederationError, match="position 9 is out of range"):
            rules.add(spec("allow", "*"), position=9)
        version = rules.version()
        rules.remove(first.rule_id)
        assert rules.version() > version
        assert [r.rule_id for r in rules.rules()] == [inserted.rule_id, last.rule_id]
        with pytest.raises(FederationError, match="no authorization rule"):
            rules.remove(first.rule_id)


def test_config_rules_come_first_and_cannot_be_removed_by_the_api(tmp_path):
    with AuthzRules(tmp_path) as rules:
        api_rule = rules.add(spec("allow", "*"))
        rules.replace_config_rules([spec("deny", "spiffe://spire.test/*")])
        ordered = rules.rules()
        assert [(r.source, r.pattern) for r in ordered] == [("config", "spiffe://spire.test/*"), ("api", "*")]
        version = rules.version()
        rules.replace_config_rules([spec("deny", "spiffe://spire.test/*")])
        assert rules.version() == version, "an unchanged zone.toml must not churn the rules"
        with pytest.raises(FederationError, match=r"zone\.toml"):
            rules.remove(ordered[0].rule_id)
        rules.replace_config_rules([])
        assert [r.rule_id for r in rules.rules()] == [api_rule.rule_id]


@pytest.mark.parametrize(
    "pattern",
    ["west.mesh/*", "spiffe://West/x", "spiffe://west.mesh/a/../b", "spiffe://west.mesh/*/sa/x", "", "**"],
)
def test_bad_patterns_are_refused_with_the_forms_that_work(pattern):
    with pytest.raises(ValueError, match="not a SPIFFE ID pattern"):
        spec("allow", pattern)


def test_pattern_matching_is_by_whole_segments():
    assert pattern_matches("*", "spiffe://any/x")
    assert pattern_matches("spiffe://west.mesh/ns/shop/*", "spiffe://west.mesh/ns/shop/sa/cart")
    assert not pattern_matches("spiffe://west.mesh/ns/sh/*", "spiffe://west.mesh/ns/shop/sa/cart")
    assert not pattern_matches("spiffe://west.mesh/*", "spiffe://west.mesh.evil/ns/x")
    assert pattern_matches("spiffe://west.mesh/ns/a", "spiffe://west.mesh/ns/a")
    assert not pattern_matches("spiffe://west.mesh/ns/a", "spiffe://west.mesh/ns/a/b")


def _orders() -> Service:
    return Service(
        name="orders",
        namespace="shop",
        ports={"tcp": 8080, "admin": 9090},
        endpoints=[Endpoint(address="127.0.0.1", port=18080)],
    )


def _imported(peer: str, service: str) -> ImportedService:
    exported = ExportedService(
        name=service, namespace="shop", ports={"tcp": 8080}, healthy_endpoints=1, total_endpoints=1
    )
    snapshot = ServiceSnapshot(
        zone=peer, trust_domain=f"{peer}.mesh", gateway_addresses=["127.0.0.1:15443"], version=1, services=[exported]
    )
    return ImportedService(peer=peer, origin=ImportOrigin.of(snapshot), service=exported)


def _config(tmp_path, authz: AuthzIndex, exports: list[ExportRule], egress: EgressPolicy | None = None):
    zone = Zone.init(tmp_path / "east", "east", "east.mesh")
    peers = [Zone.init(tmp_path / name, name, f"{name}.mesh") for name in ("west", "north")]
    return build_gateway_config(
        identity=gateway_identity(zone),
        trust_bundles=bundle_roots_pem([z.trust.own_bundle() for z in (zone, *peers)]),
        trust_domain=zone.trust_domain,
        ingress_address="127.0.0.1:0",
        catalog=CatalogSnapshot(version=1, services=[_orders()]),
        exports=ExportIndex(exports),
        peer_trust_domains={"west": WEST, "north": TrustDomain("north.mesh")},
        imports=[_imported("west", "cart"), _imported("north", "cart")],
        egress_address=lambda _: "127.0.0.1:0",
        authz=authz,
        egress=egress,
        proxy_protocol=frozenset({("shop", "orders")}),
    )


def test_without_rules_the_peers_an_export_names_may_call(tmp_path):
    config = _config(tmp_path, AuthzIndex(), [ExportRule("shop", "orders", "west")])
    ingress = config.listeners[0]
    assert isinstance(ingress, TerminateListener)
    east = TrustDomain("east.mesh")
    assert {route.sni for route in ingress.routes} == {service_sni("orders", "shop", p, east) for p in (8080, 9090)}
    for route in ingress.routes:
        assert route.rules == [AuthzRule(action="allow", id="spiffe://west.mesh/*")]
        assert route.proxy_protocol
    # Every peer's gateway may vouch for its own workloads; none for another domain (enforced by the core).
    assert ingress.trusted_gateways == [str(TrustDomain("north.mesh").gateway_id), str(WEST.gateway_id)]


def test_a_service_with_rules_gets_exactly_its_rules_per_port(tmp_path):
    with AuthzRules(tmp_path) as store:
        store.add(spec("deny", "spiffe://west.mesh/ns/shop/sa/intruder"))
        store.add(spec("allow", "spiffe://west.mesh/ns/shop/*"))
        store.add(spec("allow", "spiffe://spire.test/ops/*", port=9090))
        rules = store.rules()
    # Not exported at all: rules alone open the route (a SPIRE trust domain federated by bundle).
    config = _config(tmp_path, AuthzIndex(rules), [])
    ingress = config.listeners[0]
    assert isinstance(ingress, TerminateListener)
    by_port = {route.sni.split(".")[1].rstrip("_"): route.rules for route in ingress.routes}
    common = [
        AuthzRule(action="deny", id="spiffe://west.mesh/ns/shop/sa/intruder"),
        AuthzRule(action="allow", id="spiffe://west.mesh/ns/shop/*"),
    ]
    assert by_port == {"8080": common, "9090": [*common, AuthzRule(action="allow", id="spiffe://spire.test/ops/*")]}
    validate(config)


def test_egress_workload_tls_zone_default_and_per_import(tmp_path):
    egress = EgressPolicy.model_validate(
        {
            "workload_tls": "strict",
            "import": [ImportOverride(service="cart", namespace="shop", peer="north", workload_tls="plain")],
        }
    )
    config = _config(tmp_path, AuthzIndex(), [], egress)
    modes = {
        listener.name: listener.workload_tls for listener in config.listeners if isinstance(listener, OriginateListener)
    }
    assert modes == {
        "egress:cart.shop.west:tcp": "strict",
        "egress:cart.shop.north:tcp": "plain",
        "failover:cart.shop:tcp": "strict",
    }
    for cluster in config.clusters:
        for endpoint in cluster.endpoints:
            assert endpoint.tls is None or endpoint.tls.convey_caller
    validate(config)


def test_zone_toml_egress_and_authz_tables_parse(tmp_path):
    zone = Zone.init(tmp_path / "z", "z", "z.mesh")
    toml = (zone.directory / "zone.toml").read_text()
    (zone.directory / "zone.toml").write_text(
        toml + '\n[[authz]]\nservice = "orders"\nnamespace = "shop"\naction = "allow"\nid = "spiffe://west.mesh/*"\n'
    )
    text = (zone.directory / "zone.toml").read_text()
    text += '\n[egress]\nworkload_tls = "strict"\n[[egress.import]]\nservice = "cart"\nworkload_tls = "permissive"\n'
    (zone.directory / "zone.toml").write_text(text)
    config = Zone.open(zone.directory).config
    assert config.egress.workload_tls == "strict"
    assert config.egress.mode("cart", "default", "west") == "permissive"
    assert config.authz[0].id == "spiffe://west.mesh/*"


def test_cli_adds_lists_and_removes_rules_with_json_output(tmp_path):
    Zone.init(tmp_path / "east", "east", "east.mesh")
    base = ["--dir", str(tmp_path / "east")]
    added = meshfed_cli(
        "authz", "add", *base, "--service", "orders", "--namespace", "shop", "--deny", "*", "-o", "json"
    )
    assert added.returncode == 0, added.stderr
    rule = orjson.loads(added.stdout)
    assert rule["action"] == "deny"
    assert rule["id"] == "*"
    listed = meshfed_cli("authz", "list", *base, "-o", "json")
    assert [r["rule_id"] for r in orjson.loads(listed.stdout)] == [rule["rule_id"]]
    bad = meshfed_cli("authz", "add", *base, "--service", "orders", "--allow", "west.mesh/*")
    assert_one_line_error(bad, "not a SPIFFE ID pattern")
    missing = meshfed_cli("authz", "remove", *base, "--id", "999")
    assert_one_line_error(missing, "no authorization rule 999")
    removed = meshfed_cli("authz", "remove", *base, "--id", str(rule["rule_id"]))
    assert removed.returncode == 0, removed.stderr
    assert orjson.loads(meshfed_cli("authz", "list", *base, "-o", "json").stdout) == []
    audit_lines = (tmp_path / "east" / "audit.log").read_text().splitlines()
    assert [orjson.loads(line)["action"] for line in audit_lines][-2:] == ["authz.add", "authz.remove"]


def test_api_lists_adds_and_removes_rules_with_the_right_tokens(tmp_path):
    zone = Zone.init(tmp_path / "east", "east", "east.mesh")
    with AuthzRules(zone.directory) as store:
        store.replace_config_rules([spec("deny", "spiffe://west.mesh/ns/shop/sa/intruder")])
    api = TestClient(
        create_app(Controller(zone, ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0)))
    )  # lifespan not run: zone stopped
    admin = {"Authorization": f"Bearer {zone.admin_token()}"}
    reader = {"Authorization": f"Bearer {zone.read_token()}"}
    body = {"service": "orders", "namespace": "shop", "action": "allow", "id": "spiffe://west.mesh/ns/shop/*"}

    assert api.get("/v1/authz").status_code == 401
    assert api.post("/v1/authz", json=body, headers=reader).status_code == 403
    created = api.post("/v1/authz", json=body, headers=admin)
    assert created.status_code == 201, created.text
    rule = created.json()
    listed = api.get("/v1/authz", headers=reader).json()
    assert [(r["source"], r["action"]) for r in listed] == [("config", "deny"), ("api", "allow")]

    bad = api.post("/v1/authz", json={**body, "id": "west.mesh/*"}, headers=admin)
    assert bad.status_code == 422
    assert "not a SPIFFE ID pattern" in bad.text
    config_rule = listed[0]["rule_id"]
    assert api.delete(f"/v1/authz/{config_rule}", headers=admin).status_code == 409
    assert api.delete(f"/v1/authz/{rule['rule_id']}", headers=admin).status_code == 204
    assert api.delete(f"/v1/authz/{rule['rule_id']}", headers=admin).status_code == 404
    actions = [orjson.loads(line)["action"] for line in (zone.directory / "audit.log").read_text().splitlines()]
    assert actions == ["authz.add", "authz.remove"]


def test_exporting_to_a_name_that_is_no_peering_says_how_to_admit_a_trust_domain(tmp_path):
    Zone.init(tmp_path / "east", "east", "east.mesh")
    result = meshfed_cli("export", "add", "--dir", tmp_path / "east", "--service", "orders", "--to", "spire")
    assert result.returncode == 0, result.stderr
    assert "no peering named 'spire'" in result.stderr.decode()
    assert "meshfed authz add" in result.stderr.decode()
    everyone = meshfed_cli("export", "add", "--dir", tmp_path / "east", "--service", "orders", "--to", "*")
    assert b"no peering named" not in everyone.stderr  # the note on the missing service stays
