"""``meshfed trust list|rotate|federate|import|export`` as a user runs them, interop with SPIRE, and key hygiene."""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshfed.trust.bundle import parse_bundle
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import Zone

SPIRE_BUNDLE = Path(__file__).parent / "data" / "spire" / "spire-server-bundle-show-spiffe.json"


def meshfed_cli(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "meshfed", *map(str, args)], input=stdin, capture_output=True, check=False, timeout=120
    )


def _one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, result.stderr.decode()
    assert "Traceback" not in lines[0]
    return lines[0]


def test_a_spire_bundle_imports_with_its_x509_and_jwt_authorities(make_zone):
    east = make_zone("east")
    result = meshfed_cli("trust", "import", SPIRE_BUNDLE, "--dir", east.directory, "--trust-domain", "example.org")
    assert result.returncode == 0, result.stderr.decode()
    assert "trusting example.org: 1 root(s), sequence 3" in result.stdout.decode()
    held = east.trust.bundle_of(TrustDomain("example.org"))
    assert held is not None
    assert len(held.jwt_authorities) == 1
    assert held.refresh_hint_seconds == 300
    # Stored and re-served, SPIRE's JWT authority survives byte for byte.
    original = json.loads(SPIRE_BUNDLE.read_text())
    assert json.loads(held.to_spiffe_json())["keys"][1] == original["keys"][1]


def test_exported_bundle_is_spec_compliant_spiffe_json(make_zone):
    east = make_zone("east")
    result = meshfed_cli("trust", "export", "--dir", east.directory)
    assert result.returncode == 0
    document = json.loads(result.stdout)
    # SPIFFE bundle spec §4.1 and X.509-SVID spec §6.1, checked field by field, as a strict consumer would.
    assert set(document) == {"keys", "spiffe_sequence", "spiffe_refresh_hint"}
    assert isinstance(document["spiffe_sequence"], int)
    assert isinstance(document["spiffe_refresh_hint"], int)
    for key in document["keys"]:
        assert key["use"] == "x509-svid"
        assert key["kty"] == "EC"
        assert "kid" not in key  # X.509-SVID §6.1: kid MUST NOT be set
        assert len(key["x5c"]) == 1
        der = base64.b64decode(key["x5c"][0], validate=True)  # standard base64 (RFC 7517 §4.7), not base64url
        x = base64.urlsafe_b64decode(key["x"] + "==")
        assert len(x) == 32
        assert "=" not in key["x"] + key["y"]  # RFC 7518: base64url without padding
        assert der
    # A consumer built on the reference vectors' rules parses it back to the same roots.
    assert parse_bundle(east.trust_domain, result.stdout).fingerprints() == east.trust.own_bundle().fingerprints()


def test_trust_list_shows_sequence_fingerprints_expiry_refresh_and_source(make_zone, tmp_path):
    east, west = make_zone("east"), make_zone("west")
    (tmp_path / "west.json").write_bytes(west.trust.own_bundle().to_spiffe_json())
    assert (
        meshfed_cli(
            "trust", "import", tmp_path / "west.json", "--dir", east.directory, "--trust-domain", "west.mesh"
        ).returncode
        == 0
    )
    # -o json: the document the API's PUT returns; the table's line says the same.
    imported = meshfed_cli(
        "trust", "import", tmp_path / "west.json", "--dir", east.directory, "--trust-domain", "west.mesh", "-o", "json"
    )
    assert imported.returncode == 0, imported.stderr.decode()
    assert json.loads(imported.stdout) == {
        "trust_domain": "west.mesh",
        "sequence": 1,
        "roots": west.trust.own_bundle().fingerprints(),
    }
    result = meshfed_cli("trust", "list", "--dir", east.directory, "--json")
    assert result.returncode == 0, result.stderr.decode()
    listing = {entry["trust_domain"]: entry for entry in json.loads(result.stdout)["trust_domains"]}
    assert listing["east.mesh"]["source"] == "self"
    assert listing["west.mesh"]["source"] == "import"
    assert listing["west.mesh"]["sequence"] == 1
    assert [root["fingerprint"] for root in listing["west.mesh"]["roots"]] == west.trust.own_bundle().fingerprints()
    assert listing["west.mesh"]["roots"][0]["expired"] is False
    assert listing["west.mesh"]["last_refresh"]
    table = meshfed_cli("trust", "list", "--dir", east.directory).stdout.decode()
    assert f"root sha256:{west.trust.own_bundle().fingerprints()[0]}" in table
    assert "west.mesh  source import  sequence 1" in table


def test_trust_list_flags_an_expired_root_and_keeps_it(make_zone):
    # The reference vector's root expired in 2023: kept (a peer may still renew it) but flagged.
    east = make_zone("east")
    vector = Path(__file__).parent / "data" / "spiffe" / "bundle" / "spiffebundle_valid_1.json"
    assert meshfed_cli("trust", "import", vector, "--dir", east.directory, "--trust-domain", "local").returncode == 0
    table = meshfed_cli("trust", "list", "--dir", east.directory).stdout.decode()
    assert "EXPIRED (verifies nothing)" in table
    assert east.trust.bundle_of(TrustDomain("local")) is not None


def test_trust_rotate_publishes_a_new_root_and_refuses_a_second_rotation(make_zone):
    east = make_zone("east")
    result = meshfed_cli("trust", "rotate", "--dir", east.directory, "--overlap", "1h")
    assert result.returncode == 0, result.stderr.decode()
    assert "bundle sequence 2" in result.stdout.decode()
    assert len(east.trust.own_bundle().roots) == 2
    error = _one_line_error(meshfed_cli("trust", "rotate", "--dir", east.directory))
    assert "a rotation is in progress" in error
    listing = json.loads(meshfed_cli("trust", "list", "--dir", east.directory, "--json").stdout)
    assert [g["phase"] for g in listing["rotation"]] == ["active", "published"]


def test_cli_calls_advance_a_due_rotation(make_zone):
    east = make_zone("east")
    assert meshfed_cli("trust", "rotate", "--dir", east.directory, "--overlap", "0s").returncode == 0
    # Nothing issued from generation 0, so it is retired as soon as the new CA signs.
    result = meshfed_cli("trust", "list", "--dir", east.directory, "--json")
    phases = [g["phase"] for g in json.loads(result.stdout)["rotation"]]
    assert phases == ["retired", "active"]
    assert east.trust.own_bundle().sequence == 3
    assert "generation 0 retired" in result.stderr.decode()


def test_trust_federate_stores_the_relationship_and_the_bootstrap_bundle(make_zone, tmp_path):
    east, west = make_zone("east"), make_zone("west")
    (tmp_path / "east.json").write_bytes(east.trust.own_bundle().to_spiffe_json())
    result = meshfed_cli(
        "trust", "federate", "--dir", west.directory, "--trust-domain", "east.mesh",
        "--endpoint", "https://127.0.0.1:8443/", "--profile", "https_spiffe",
        "--endpoint-spiffe-id", "spiffe://east.mesh/ns/meshfed-system/sa/controller",
        "--bootstrap-bundle", tmp_path / "east.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    (federation,) = Zone.open(west.directory).trust.federations()
    assert federation.profile == "https_spiffe"
    assert federation.endpoint_spiffe_id == "spiffe://east.mesh/ns/meshfed-system/sa/controller"
    assert west.trust.bundle_of(east.trust_domain).fingerprints() == east.trust.own_bundle().fingerprints()
    listing = json.loads(meshfed_cli("trust", "list", "--dir", west.directory, "--json").stdout)
    assert {e["trust_domain"]: e for e in listing["trust_domains"]}["east.mesh"][
        "endpoint"
    ] == "https://127.0.0.1:8443/"


def test_trust_federate_without_a_bootstrap_bundle_is_one_clear_error(make_zone):
    west = make_zone("west")
    error = _one_line_error(
        meshfed_cli(
            "trust",
            "federate",
            "--dir",
            west.directory,
            "--trust-domain",
            "east.mesh",
            "--endpoint",
            "https://127.0.0.1:8443/",
            "--profile",
            "https_spiffe",
            "--endpoint-spiffe-id",
            "spiffe://east.mesh/ns/meshfed-system/sa/controller",
        )
    )
    assert "--bootstrap-bundle" in error
    assert west.trust.federations() == []


def _bad_bundles(tmp_path: Path, zone: Zone) -> dict[str, Path]:
    good = zone.trust.own_bundle().to_spiffe_json()
    document = json.loads(good)
    der = bytearray(base64.b64decode(document["keys"][0]["x5c"][0]))
    der[-5] ^= 0x01
    document["keys"][0]["x5c"] = [base64.b64encode(bytes(der)).decode()]
    leaf = zone.authority.issue_svid(
        zone.trust_domain.workload("default", "web"), __import__("datetime").timedelta(hours=1)
    ).leaf
    not_ca = json.loads(good)
    not_ca["keys"][0]["x5c"] = [base64.b64encode(leaf.public_bytes(serialization.Encoding.DER)).decode()]
    two = json.loads(good)
    two["keys"][0]["x5c"] = two["keys"][0]["x5c"] * 2
    cases = {
        "tampered": json.dumps(document).encode(),
        "truncated": good[: len(good) // 2],
        "malformed": b"not json at all",
        "ca_false": json.dumps(not_ca).encode(),
        "no_keys": b'{"spiffe_sequence": 2}',
        "two_certificates": json.dumps(two).encode(),
        "jwt_without_kid": b'{"keys": [{"kty": "EC", "use": "jwt-svid", "crv": "P-256", "x": "a", "y": "b"}]}',
    }
    paths = {}
    for name, data in cases.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_bytes(data)
    return paths


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("tampered", "self-signature does not verify"),
        ("truncated", "neither PEM nor JSON"),
        ("malformed", "neither PEM nor JSON"),
        ("ca_false", "is not a CA certificate"),
        ("no_keys", "holds no authorities"),
        ("two_certificates", "exactly one certificate"),
        ("jwt_without_kid", "has no 'kid'"),
    ],
)
def test_a_bad_bundle_import_is_one_line_error_and_changes_nothing(make_zone, tmp_path, kind, reason):
    east, west = make_zone("east"), make_zone("west")
    path = _bad_bundles(tmp_path, west)[kind]
    before = (east.directory / "state.db").read_bytes()
    error = _one_line_error(
        meshfed_cli("trust", "import", path, "--dir", east.directory, "--trust-domain", "west.mesh")
    )
    assert reason in error
    assert [s.bundle.trust_domain.name for s in east.trust.trusted_bundles()] == ["east.mesh"]
    assert (east.directory / "state.db").read_bytes() == before


# -- private keys never leave their files ------------------------------------------------------------------------


def test_import_refuses_a_root_that_names_another_trust_domain(make_zone, tmp_path):
    east, west = make_zone("east"), make_zone("west")
    bundle = tmp_path / "west.bundle.json"
    bundle.write_bytes(west.trust.own_bundle().to_spiffe_json())
    message = _one_line_error(
        meshfed_cli("trust", "import", bundle, "--dir", east.directory, "--trust-domain", "north.mesh")
    )
    assert "is a root of west.mesh (URI SAN spiffe://west.mesh), not of north.mesh" in message
    assert "--trust-domain west.mesh" in message
    assert east.trust.bundle_of(TrustDomain("north.mesh")) is None


def test_import_refuses_a_root_whose_name_constraints_exclude_the_domain(make_zone, tmp_path):
    """A root without a SPIFFE URI SAN, constrained to URIs of another domain, can vouch for none of ours."""
    east = make_zone("east")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "constrained root")])
    now = dt.datetime.now(dt.UTC)
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.NameConstraints([x509.UniformResourceIdentifier("west.mesh")], None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = tmp_path / "root.pem"
    pem.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    message = _one_line_error(
        meshfed_cli("trust", "import", pem, "--dir", east.directory, "--trust-domain", "north.mesh")
    )
    assert "name constraints permitting URIs of west.mesh only" in message
    accepted = meshfed_cli("trust", "import", pem, "--dir", east.directory, "--trust-domain", "west.mesh")
    assert accepted.returncode == 0, accepted.stderr.decode()


def _key_material(zone: Zone) -> list[bytes]:
    """Every private key of the zone, as PEM text and as the raw scalar bytes (hex and base64 forms)."""
    material = []
    for key_file in zone.directory.rglob("*.key"):
        pem = key_file.read_bytes()
        key = serialization.load_pem_private_key(pem, password=None)
        scalar = key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
        body = b"".join(pem.splitlines()[1:-1])
        material += [
            body,
            scalar.hex().encode(),
            base64.b64encode(scalar),
            base64.urlsafe_b64encode(scalar).rstrip(b"="),
        ]
    return material


def _assert_no_secrets(zone: Zone, *outputs: bytes) -> None:
    material = _key_material(zone)
    assert material
    for output in outputs:
        assert b"PRIVATE KEY" not in output
        for secret in material:
            assert secret not in output


def test_no_cli_output_or_bundle_carries_a_private_key(make_zone, tmp_path):
    east, west = make_zone("east"), make_zone("west")
    (tmp_path / "west.json").write_bytes(west.trust.own_bundle().to_spiffe_json())
    runs = [
        meshfed_cli("trust", "rotate", "--dir", east.directory, "--overlap", "0s"),
        meshfed_cli("trust", "export", "--dir", east.directory),
        meshfed_cli("trust", "export", "--dir", east.directory, "--format", "pem"),
        meshfed_cli("trust", "import", tmp_path / "west.json", "--dir", east.directory, "--trust-domain", "west.mesh"),
        meshfed_cli("trust", "list", "--dir", east.directory),
        meshfed_cli("trust", "list", "--dir", east.directory, "--json"),
        meshfed_cli("trust", "import", tmp_path / "missing.json", "--dir", east.directory, "--trust-domain", "x.mesh"),
    ]
    outputs = [run.stdout for run in runs] + [run.stderr for run in runs]
    outputs.append(east.trust.own_bundle().to_spiffe_json())
    outputs.append((east.directory / "state.db").read_bytes())
    _assert_no_secrets(east, *outputs)
