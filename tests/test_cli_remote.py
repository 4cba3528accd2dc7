"""The CLI talks to a running zone through its API, and to a stopped zone's files (``meshfed.cli.remote``).

Against a real ``meshfed up`` process: with ``--dir`` of a running zone every
change goes through the API (the audit log names the API as the actor, not
the CLI), ``--api URL --token-file`` manages the zone with no zone directory
at all, a read token cannot change anything, and once the zone stops the same
commands work on the files the running zone wrote.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import orjson

from meshfed.cli.remote import API_URL_FILE
from meshfed.federation.authz import RuleView
from meshfed.trust.bundle import parse_bundle
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import READ_TOKEN_FILE, TOKEN_FILE
from tests.test_cli import meshfed_cli
from tests.test_zone_process import ephemeral_flags, meshfed_up

API_ACTOR = "api:admin@127.0.0.1"


def ok(result: subprocess.CompletedProcess[bytes]) -> bytes:
    assert result.returncode == 0, result.stderr.decode()
    assert b"Traceback" not in result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[bytes], *fragments: str) -> str:
    assert result.returncode == 1, result.stdout
    (line,) = result.stderr.decode().strip().splitlines()
    for fragment in fragments:
        assert fragment in line, line
    return line


def actors(directory: Path) -> dict[str, str]:
    """The actor of each audited action, the last one winning."""
    lines = (directory / "audit.log").read_text().splitlines()
    return {entry["action"]: entry["actor"] for entry in map(orjson.loads, lines)}


def test_the_cli_manages_a_running_zone_through_its_api(tmp_path: Path) -> None:
    east, other = tmp_path / "east", tmp_path / "other"
    ok(meshfed_cli("zone", "init", "--dir", east, "--name", "east", "--trust-domain", "east.mesh"))
    ok(meshfed_cli("zone", "init", "--dir", other, "--name", "other", "--trust-domain", "other.mesh"))
    bundle = tmp_path / "other.json"
    bundle.write_bytes(ok(meshfed_cli("trust", "export", "--dir", other)))

    with meshfed_up(east, ephemeral_flags()) as zone:
        url = zone.wait_serving()
        # --dir of a running zone: the zone's API makes each change, as the audit log's actor shows.
        d = ("--dir", east)
        registered = meshfed_cli(
            "service", "register", *d, "--name", "web", "--port", "http=8080", "--endpoint", "127.0.0.1:9", "-o", "json"
        )
        assert orjson.loads(ok(registered)).keys() == {"service", "namespace", "catalog_version"}
        added = meshfed_cli("export", "add", *d, "--service", "web", "--to", "west", "-o", "json")
        assert orjson.loads(ok(added)) == [{"service": "web", "namespace": "default", "peer": "west"}]
        assert b"no peering named 'west'" in added.stderr
        ok(meshfed_cli("authz", "add", *d, "--service", "web", "--allow", "spiffe://west.mesh/*"))
        imported = orjson.loads(
            ok(meshfed_cli("trust", "import", bundle, *d, "--trust-domain", "other.mesh", "-o", "json"))
        )
        assert imported == {
            "trust_domain": "other.mesh",
            "sequence": 1,
            "roots": parse_bundle(TrustDomain.parse("other.mesh"), bundle.read_bytes()).fingerprints(),
        }
        audited = actors(east)
        for action in ("service.register", "export.add", "authz.add", "trust.import"):
            assert audited[action] == API_ACTOR, (action, audited)

        # --api with a token file and no zone directory: everything a zone directory gave.
        admin = ("--api", url, "--token-file", east / TOKEN_FILE)
        reader = ("--api", url, "--token-file", east / READ_TOKEN_FILE)
        exports = orjson.loads(ok(meshfed_cli("export", "list", *reader, "-o", "json")))
        assert exports == [{"service": "web", "namespace": "default", "peer": "west"}]
        (rule,) = orjson.loads(ok(meshfed_cli("authz", "list", *reader, "-o", "json")))
        assert list(rule) == list(RuleView.model_fields)
        assert rule["id"] == "spiffe://west.mesh/*"
        catalog = orjson.loads(ok(meshfed_cli("catalog", "list", *reader, "-o", "json")))
        assert [service["name"] for service in catalog["services"]] == ["web"]
        listing = orjson.loads(ok(meshfed_cli("trust", "list", *reader, "-o", "json")))
        assert "other.mesh" in {domain["trust_domain"] for domain in listing["trust_domains"]}
        token = ok(meshfed_cli("peer", "token", *admin, "--peer", "west")).strip()
        assert token
        issued = orjson.loads(ok(meshfed_cli("peer", "token", *admin, "--peer", "south", "-o", "json")))
        assert list(issued) == ["token", "expires_at", "addresses"]
        assert issued["addresses"], "a running zone puts where it serves establishment in the token"
        deleted = orjson.loads(ok(meshfed_cli("peer", "delete", *admin, "south", "-o", "json")))
        assert deleted == {"name": "south", "deleted": True}
        started = orjson.loads(ok(meshfed_cli("trust", "rotate", *admin, "--overlap", "1h", "-o", "json")))
        assert list(started) == ["generation", "root_fingerprint", "activate_at"]
        ended = orjson.loads(ok(meshfed_cli("trust", "rotate", *admin, "--abort", "-o", "json")))
        assert [step["generation"] for step in ended["steps"]] == [started["generation"]]
        (pending,) = orjson.loads(ok(meshfed_cli("peer", "list", *reader, "-o", "json")))
        assert (pending["name"], pending["state"]) == ("west", "PENDING")
        shown = orjson.loads(ok(meshfed_cli("peer", "show", "west", *reader, "-o", "json")))
        assert shown["connected"] is False, "a running zone knows the stream is down"

        # A read token changes nothing, and says so in one line; so does a zone nobody serves.
        one_line_error(meshfed_cli("export", "remove", *reader, "--service", "web"), "403", "--token-file")
        one_line_error(
            meshfed_cli("export", "list", "--api", "http://127.0.0.1:9", "--token-file", east / READ_TOKEN_FILE),
            "cannot reach the zone's API at http://127.0.0.1:9",
        )
        one_line_error(meshfed_cli("export", "list", "--api", url), "give --token-file")
        not_a_url = meshfed_cli("export", "list", "--api", "127.0.0.1:8470", "--token-file", east / READ_TOKEN_FILE)
        assert not_a_url.returncode == 2, not_a_url.stderr  # a usage error, said in one line
        (line,) = not_a_url.stderr.decode().strip().splitlines()
        assert "--api '127.0.0.1:8470' is not an API URL" in line

        ok(meshfed_cli("authz", "remove", *admin, "--service", "web"))
        exports_gone = orjson.loads(
            ok(meshfed_cli("export", "remove", *admin, "--service", "web", "--to", "west", "-o", "json"))
        )
        assert exports_gone == {"service": "web", "namespace": "default", "to": ["west"], "removed": 1}
        ok(meshfed_cli("export", "add", *admin, "--service", "web", "--to", "west"))
        gone = orjson.loads(ok(meshfed_cli("trust", "remove", *admin, "--trust-domain", "other.mesh", "-o", "json")))
        assert gone == {"trust_domain": "other.mesh", "bundle_removed": True, "federation_removed": False}
        assert actors(east)["authz.remove"] == API_ACTOR
        assert zone.stop() == 0

    # Stopped: the same commands read the files the running zone wrote; a stale record is ignored.
    (east / API_URL_FILE).write_text(url + "\n")
    assert orjson.loads(ok(meshfed_cli("export", "list", "--dir", east, "-o", "json")))[0]["service"] == "web"
    assert orjson.loads(ok(meshfed_cli("authz", "list", "--dir", east, "-o", "json"))) == []
    offline = orjson.loads(ok(meshfed_cli("peer", "show", "west", "--dir", east, "-o", "json")))
    assert offline["connected"] is None, "of a zone that is not running, whether the stream is up is unknown"
    ok(meshfed_cli("export", "remove", "--dir", east, "--service", "web"))
    assert actors(east)["export.remove"].startswith("cli:")
    added_here = meshfed_cli("export", "add", "--dir", east, "--service", "web", "--to", "*", "-o", "json")
    assert orjson.loads(ok(added_here)) == [{"service": "web", "namespace": "default", "peer": "*"}]
    assert ok(meshfed_cli("export", "add", "--dir", east, "--service", "web", "--to", "*")).strip() == (
        b"exported web.default to *"
    )
