"""``-o table|json|yaml``: JSON shapes as documented (the API's, for the commands that change a zone too), plain
tables when piped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from meshfed.api.catalog import CatalogView, ExportRuleView, ServiceChangeView
from meshfed.api.peering import TokenResponse
from meshfed.federation.authz import RuleView
from meshfed.federation.peer_status import PeerStatus
from tests.test_cli import meshfed_cli

# Box drawing (U+2500-U+257F), which rich's tables are drawn with.
LOOPBACK_9 = "127.0.0.1:9"  # discard: nothing needs to answer, the zone never runs
BOX_DRAWING = {chr(code) for code in range(0x2500, 0x2580)}


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zone with a service, an export, an authorization rule and a pending peering."""
    directory = tmp_path_factory.mktemp("output") / "west"
    for args in (
        ("zone", "init", "--dir", directory, "--name", "west", "--trust-domain", "west.mesh"),
        ("service", "register", "--dir", directory, "--name", "web", "--port", "http=8080", "--endpoint", LOOPBACK_9),
        ("export", "add", "--dir", directory, "--service", "web", "--to", "*"),
        ("authz", "add", "--dir", directory, "--service", "web", "--allow", "spiffe://east.mesh/*"),
        ("peer", "token", "--dir", directory, "--peer", "east", "--address", "127.0.0.1:15443"),
    ):
        result = meshfed_cli(*args)
        assert result.returncode == 0, result.stderr.decode()
    return directory


def json_of(*args: str | Path) -> Any:
    result = meshfed_cli(*args, "-o", "json")
    assert result.returncode == 0, result.stderr.decode()
    return orjson.loads(result.stdout)


def test_catalog_and_service_list_print_the_catalog_api_object(zone: Path) -> None:
    for command in (("catalog", "list"), ("service", "list")):
        document = json_of(*command, "--dir", zone)
        assert list(document) == list(CatalogView.model_fields)
        CatalogView.model_validate(document)
        assert document["source"] == {"mode": "embedded", "error": None}
        (web,) = document["services"]
        assert (web["name"], web["namespace"], web["ports"]) == ("web", "default", {"http": 8080})
        assert [(e["address"], e["port"], e["healthy"]) for e in web["endpoints"]] == [("127.0.0.1", 9, True)]
        assert document["imports"] == []
        assert document["failover_groups"] == []


def test_export_list_prints_the_exports_api_objects(zone: Path) -> None:
    rules = json_of("export", "list", "--dir", zone)
    assert rules == [{"service": "web", "namespace": "default", "peer": "*"}]
    assert [ExportRuleView.model_validate(rule) for rule in rules]


def test_peer_list_and_show_print_peer_status(zone: Path) -> None:
    (listed,) = json_of("peer", "list", "--dir", zone)
    assert list(listed) == list(PeerStatus.model_fields)
    assert (listed["name"], listed["role"], listed["state"]) == ("east", "acceptor", "PENDING")
    shown = json_of("peer", "show", "--dir", zone, "east")
    assert list(shown) == list(PeerStatus.model_fields)
    assert shown["name"] == "east"
    assert shown["connected"] is None, "of a zone that is not running, whether the stream is up is unknown"


def test_authz_trust_and_zone_token(zone: Path) -> None:
    (rule,) = json_of("authz", "list", "--dir", zone)
    assert list(rule) == list(RuleView.model_fields)  # the API's shape (GET /v1/authz)
    assert {k: rule[k] for k in ("service", "namespace", "action", "id")} == {
        "service": "web",
        "namespace": "default",
        "action": "allow",
        "id": "spiffe://east.mesh/*",
    }
    listing = json_of("trust", "list", "--dir", zone)
    assert [domain["trust_domain"] for domain in listing["trust_domains"]] == ["west.mesh"]
    assert "rotation" in listing
    token = json_of("zone", "token", "--dir", zone, "--read")
    assert list(token) == ["zone", "kind", "token", "file"]
    assert token["kind"] == "read"
    assert token["token"] == (zone / "read-token").read_text().strip()


def test_yaml_is_the_json_document(zone: Path) -> None:
    for command in (("catalog", "list"), ("peer", "show", "east"), ("export", "list"), ("trust", "list")):
        result = meshfed_cli(*command, "--dir", zone, "-o", "yaml")
        assert result.returncode == 0, result.stderr.decode()
        assert yaml.safe_load(result.stdout) == json_of(*command, "--dir", zone)


@pytest.mark.parametrize(
    ("command", "header"),
    [
        (("catalog", "list"), "service\tports\tzone\thealthy\tendpoints\tlocal address"),
        (("service", "list"), "service\tports\tzone\thealthy\tendpoints\tlocal address"),
        (("export", "list"), "service\tto"),
        (("peer", "list"), "peer\tzone\trole\tstate\theartbeat age\tsent/acked\treceived\texported\timported"),
        (("authz", "list"), "id\tservice\tport\taction\tcaller\tfrom"),
    ],
)
def test_piped_tables_are_tab_separated(zone: Path, command: tuple[str, ...], header: str) -> None:
    result = meshfed_cli(*command, "--dir", zone)
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    assert not BOX_DRAWING & set(text), text
    lines = text.splitlines()
    assert lines[0] == header
    assert len(lines) == 2
    assert lines[1].count("\t") == header.count("\t")


def test_an_unknown_output_is_a_usage_error(zone: Path) -> None:
    result = meshfed_cli("peer", "list", "--dir", zone, "-o", "xml")
    assert result.returncode == 2
    assert len(result.stderr.decode().strip().splitlines()) == 1


def test_changes_print_what_the_api_answers(tmp_path: Path) -> None:
    """The mutating commands on a zone that does not run: -o json is the document the API answers for them."""
    directory = tmp_path / "north"
    d = ("--dir", directory)
    assert meshfed_cli("zone", "init", *d, "--name", "north", "--trust-domain", "north.mesh").returncode == 0

    registered = json_of("service", "register", *d, "--name", "web", "--port", "http=8080", "--endpoint", LOOPBACK_9)
    assert list(registered) == list(ServiceChangeView.model_fields)
    assert (registered["service"], registered["namespace"]) == ("web", "default")
    assert registered["catalog_version"] >= 1
    json_of("export", "add", *d, "--service", "web", "--to", "east", "--to", "west")
    removed = json_of("export", "remove", *d, "--service", "web", "--to", "west")
    assert removed == {"service": "web", "namespace": "default", "to": ["west"], "removed": 1}
    assert json_of("export", "remove", *d, "--service", "web")["removed"] == 1  # east's, the one left
    deregistered = json_of("service", "deregister", *d, "--name", "web")
    assert deregistered["catalog_version"] > registered["catalog_version"]

    token = json_of("peer", "token", *d, "--peer", "east", "--address", "127.0.0.1:15443")
    assert list(token) == list(TokenResponse.model_fields)
    assert token["addresses"] == ["127.0.0.1:15443"]
    assert token["token"]
    assert json_of("peer", "delete", *d, "east") == {"name": "east", "deleted": False}  # recorded; the zone is down

    issued = json_of(
        "trust", "issue", *d, "--spiffe-id", "spiffe://north.mesh/ns/default/sa/web",
        "--out", tmp_path / "web.pem", "--key-out", tmp_path / "web.key",
    )  # fmt: skip
    assert issued["spiffe_id"] == "spiffe://north.mesh/ns/default/sa/web"
    assert (issued["certificate_file"], issued["key_file"]) == (str(tmp_path / "web.pem"), str(tmp_path / "web.key"))
    assert "PRIVATE KEY" not in str(issued)
    started = json_of("trust", "rotate", *d, "--overlap", "1h")
    assert list(started) == ["generation", "root_fingerprint", "activate_at"]
    assert started["generation"] == 1  # the first rotation: generation 0 is the zone's first CA
    ended = json_of("trust", "rotate", *d, "--abort")
    assert [step["generation"] for step in ended["steps"]] == [1]
    assert ended["bundle_sequence"] >= 1
    federated = json_of(
        "trust", "federate", *d, "--trust-domain", "spire.mesh", "--endpoint", "https://127.0.0.1:9/bundle",
        "--profile", "https_web",
    )  # fmt: skip
    assert federated == {
        "trust_domain": "spire.mesh",
        "endpoint_url": "https://127.0.0.1:9/bundle",
        "profile": "https_web",
    }
