"""Ending a CA rotation early (``--finish``), dropping it (``--abort``), and zones whose root key is offline."""

from __future__ import annotations

import asyncio
import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from fastapi.testclient import TestClient

from meshfed.controller import ControllerSettings
from meshfed.errors import RotationError, UntrustedSvidError
from meshfed.federation.settings import PeeringSettings
from meshfed.runtime import ZoneSettings, assemble_zone
from meshfed.trust.bundle import fingerprint
from meshfed.trust.ca import load_private_key_pem
from meshfed.trust.endpoint import endpoint_spiffe_id
from meshfed.trust.endpoint_client import EndpointSpec, fetch_bundle
from meshfed.trust.svid import verify_x509_svid
from meshfed.zone import Zone
from tests.conftest import free_port
from tests.test_trust_cli import _one_line_error, meshfed_cli

HOUR = dt.timedelta(hours=1)
WEB = "spiffe://east.mesh/ns/default/sa/web"
LOOPBACK = ZoneSettings(
    controller=ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0, health_check=None),
    peering=PeeringSettings(listen_address="127.0.0.1:0", establish_address="127.0.0.1:0", advertise_host="127.0.0.1"),
)


def _svid(zone: Zone):
    return zone.authority.issue_svid(zone.trust_domain.workload("default", "web"), HOUR)


def _verifies(zone: Zone, svid) -> bool:
    try:
        verify_x509_svid(
            [svid.leaf, *svid.intermediates], {zone.trust_domain: zone.trust.own_bundle()}, dt.datetime.now(dt.UTC)
        )
    except UntrustedSvidError:
        return False
    return True


def _phases(zone: Zone) -> dict[int, str]:
    return {g.generation: g.state for g in zone.authority.generations()}


def test_finish_makes_a_published_ca_sign_now_and_drops_the_old_root_at_once(make_zone):
    east = make_zone("east")
    old_svid = _svid(east)
    old_root = east.trust.own_bundle().fingerprints()[0]
    generation = east.authority.rotate(overlap=dt.timedelta(days=1))
    assert east.trust.own_bundle().sequence == 2
    steps = east.authority.finish()
    assert [(s.generation, s.state) for s in steps] == [(0, "retired"), (generation.generation, "active")]
    assert _phases(east) == {0: "retired", 1: "active"}
    bundle = east.trust.own_bundle()
    assert bundle.fingerprints() == [generation.root_fingerprint]
    assert bundle.sequence == 3
    assert old_root not in bundle.fingerprints()
    assert not (east.directory / "ca" / "intermediate.key").exists()
    assert not (east.directory / "ca" / "root.key").exists()
    # What the compromised CA signed verifies no more; what the zone signs now comes from the new CA.
    assert not _verifies(east, old_svid)
    new_svid = _svid(east)
    assert _verifies(east, new_svid)
    assert fingerprint(east.authority.signing_ca().root) == generation.root_fingerprint


def test_finish_retires_a_retiring_root_before_its_svids_expire(make_zone):
    east = make_zone("east")
    old_svid = _svid(east)  # its TTL keeps the old root in the bundle for an hour once the new CA signs
    east.authority.rotate(overlap=dt.timedelta(0))
    east.authority.advance()
    assert _phases(east) == {0: "retiring", 1: "active"}
    assert _verifies(east, old_svid)
    (step,) = east.authority.finish()
    assert (step.generation, step.state) == (0, "retired")
    assert _phases(east) == {0: "retired", 1: "active"}
    assert len(east.trust.own_bundle().roots) == 1
    assert not _verifies(east, old_svid)
    with pytest.raises(RotationError, match="no rotation is in progress; nothing to finish"):
        east.authority.finish()


def test_abort_drops_the_new_ca_before_it_signs_and_the_next_rotation_gets_a_new_number(make_zone):
    east = make_zone("east")
    before = east.trust.own_bundle()
    generation = east.authority.rotate(overlap=dt.timedelta(days=1))
    (step,) = east.authority.abort()
    assert (step.generation, step.state) == (generation.generation, "retired")
    assert "aborted" in step.message
    bundle = east.trust.own_bundle()
    assert bundle.fingerprints() == before.fingerprints()
    assert bundle.sequence == before.sequence + 2  # published, then withdrawn: consumers see both
    assert _phases(east) == {0: "active", 1: "retired"}
    assert not (east.directory / generation.directory / "intermediate.key").exists()
    assert _verifies(east, _svid(east))
    again = east.authority.rotate(overlap=dt.timedelta(days=1))
    assert again.generation == 2
    assert again.root_fingerprint != generation.root_fingerprint


def test_abort_is_refused_once_the_new_ca_signs_and_when_nothing_rotates(make_zone):
    east = make_zone("east")
    with pytest.raises(RotationError, match="no rotation is in progress; nothing to abort"):
        east.authority.abort()
    _svid(east)
    east.authority.rotate(overlap=dt.timedelta(0))
    east.authority.advance()
    with pytest.raises(RotationError, match=r"generation 1 already signs.*rotate --finish"):
        east.authority.abort()
    assert _phases(east) == {0: "retiring", 1: "active"}


def test_rotate_finish_and_abort_on_the_command_line(make_zone):
    east = make_zone("east")
    assert meshfed_cli("trust", "rotate", "--dir", east.directory, "--overlap", "1d").returncode == 0
    aborted = meshfed_cli("trust", "rotate", "--dir", east.directory, "--abort")
    assert aborted.returncode == 0, aborted.stderr.decode()
    assert "CA generation 1 retired: aborted" in aborted.stdout.decode()
    assert meshfed_cli("trust", "rotate", "--dir", east.directory, "--overlap", "1d").returncode == 0
    finished = meshfed_cli("trust", "rotate", "--dir", east.directory, "--finish")
    assert finished.returncode == 0, finished.stderr.decode()
    assert "CA generation 2 active" in finished.stdout.decode()
    assert _phases(east) == {0: "retired", 1: "retired", 2: "active"}
    both = _one_line_error(meshfed_cli("trust", "rotate", "--dir", east.directory, "--finish", "--abort"))
    assert "give one" in both
    nothing = _one_line_error(meshfed_cli("trust", "rotate", "--dir", east.directory, "--abort"))
    assert "no rotation is in progress" in nothing


def test_finish_through_the_api_moves_the_running_gateway_and_bundle_endpoint_to_the_new_ca(make_zone):
    """After an emergency finish, a consumer holding only the new bundle reaches the https_spiffe endpoint:
    the finish renews the endpoint's SVID before it answers."""
    east = make_zone("east")
    port = free_port()
    admin = {"Authorization": f"Bearer {east.admin_token()}"}
    runtime = assemble_zone(east, ZoneSettings(**{**LOOPBACK.__dict__, "bundle_endpoint_port": port}))
    with TestClient(runtime.app()) as client:
        rotated = client.post("/v1/trust/rotate", json={"overlap_seconds": 86400}, headers=admin)
        assert rotated.status_code == 200, rotated.text
        finished = client.post("/v1/trust/rotate", json={"finish": True}, headers=admin)
        assert finished.status_code == 200, finished.text
        assert [s["phase"] for s in finished.json()["steps"]] == ["retired", "active"]
        new = east.authority.signing_ca()
        gateway_svid = runtime.controller.gateway_svid
        assert gateway_svid is not None
        assert gateway_svid.intermediates[0] == new.intermediate
        spec = EndpointSpec(
            east.trust_domain, f"https://127.0.0.1:{port}/", "https_spiffe", endpoint_spiffe_id(east.trust_domain)
        )

        # The finish renewed the endpoint's SVID before answering: the new bundle alone authenticates it now.
        asyncio.run(fetch_bundle(spec, east.trust.own_bundle(), timeout=5))
        again = client.post("/v1/trust/rotate", json={"abort": True}, headers=admin)
        assert again.status_code == 400
        assert "no rotation is in progress" in again.json()["detail"]


# -- the root key offline ---------------------------------------------------------------------------------------


def _init_offline(tmp_path: Path, name: str = "east") -> tuple[Zone, Path]:
    key = tmp_path / f"{name}-root.key"
    result = meshfed_cli(
        *("zone", "init", "--dir", tmp_path / name, "--name", name, "--trust-domain", f"{name}.mesh"),
        *("--offline-root-key", key),
    )
    assert result.returncode == 0, result.stderr.decode()
    assert f"the root key is in {key}" in result.stderr.decode()
    return Zone.open(tmp_path / name), key


def test_zone_init_writes_the_root_key_only_to_the_offline_file(tmp_path):
    east, key = _init_offline(tmp_path)
    assert not (east.directory / "ca" / "root.key").exists()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    root_key = load_private_key_pem(key.read_bytes(), "root key")
    assert root_key.public_key() == east.authority.signing_ca().root.public_key()
    assert east.authority.root_key_offline()
    # The zone signs as any other: the intermediate is in the zone.
    assert _verifies(east, _svid(east))
    inside = _one_line_error(
        meshfed_cli(
            *("zone", "init", "--dir", tmp_path / "west", "--name", "west", "--trust-domain", "west.mesh"),
            *("--offline-root-key", tmp_path / "west" / "root.key"),
        )
    )
    assert "outside the zone directory" in inside
    taken = _one_line_error(
        meshfed_cli(
            *("zone", "init", "--dir", tmp_path / "west", "--name", "west", "--trust-domain", "west.mesh"),
            *("--offline-root-key", key),
        )
    )
    assert "the file exists" in taken
    assert not (tmp_path / "west").exists()


def test_rotating_an_offline_root_zone_needs_the_root_key_and_keeps_the_root(tmp_path):
    east, key = _init_offline(tmp_path)
    missing = _one_line_error(meshfed_cli("trust", "rotate", "--dir", east.directory))
    assert "keeps its root key offline: give it with --root-key FILE" in missing
    old_svid = _svid(east)
    before = east.trust.own_bundle()

    rotated = meshfed_cli("trust", "rotate", "--dir", east.directory, "--root-key", key)
    assert rotated.returncode == 0, rotated.stderr.decode()
    assert "new intermediate under the current root" in rotated.stdout.decode()
    east.authority.advance()  # no overlap: the bundle did not change, so nobody needs to fetch anything
    assert east.trust.own_bundle() == before
    assert _phases(east) == {0: "retiring", 1: "active"}
    new_svid = _svid(east)
    assert new_svid.intermediates[0] != old_svid.intermediates[0]
    assert _verifies(east, new_svid)
    assert _verifies(east, old_svid)
    east.authority.finish()  # the old intermediate's keys go; the root they shared stays published
    assert east.trust.own_bundle().fingerprints() == before.fingerprints()
    assert not (east.directory / "ca" / "intermediate.key").exists()
    assert _verifies(east, _svid(east))
    assert not any(east.directory.rglob("root.key"))


def test_a_wrong_root_key_is_refused_and_changes_nothing(tmp_path, make_zone):
    east, _ = _init_offline(tmp_path)
    other = make_zone("other")
    wrong = _one_line_error(
        meshfed_cli("trust", "rotate", "--dir", east.directory, "--root-key", other.directory / "ca" / "root.key")
    )
    assert "is not the key of the root" in wrong
    unreadable = _one_line_error(
        meshfed_cli("trust", "rotate", "--dir", east.directory, "--root-key", tmp_path / "nowhere.key")
    )
    assert "--root-key" in unreadable
    assert _phases(east) == {0: "active"}


def test_an_offline_root_zone_rotates_to_a_new_offline_root(tmp_path):
    east, _ = _init_offline(tmp_path)
    new_key = tmp_path / "east-root-2.key"
    rotated = meshfed_cli("trust", "rotate", "--dir", east.directory, "--offline-root-key", new_key, "--overlap", "0s")
    assert rotated.returncode == 0, rotated.stderr.decode()
    generation = east.authority.generations()[-1]
    root = x509.load_pem_x509_certificate((east.directory / generation.directory / "root.pem").read_bytes())
    assert load_private_key_pem(new_key.read_bytes(), "new key").public_key() == root.public_key()
    assert not any(east.directory.rglob("root.key"))
    assert len(east.trust.own_bundle().roots) == 2


def test_the_api_does_not_take_an_offline_root_key(tmp_path):
    east, _ = _init_offline(tmp_path)
    admin = {"Authorization": f"Bearer {east.admin_token()}"}
    with TestClient(assemble_zone(east, LOOPBACK).app()) as client:
        refused = client.post("/v1/trust/rotate", json={}, headers=admin)
    assert refused.status_code == 400
    assert "meshfed trust rotate --root-key FILE" in refused.json()["detail"]
    assert _phases(east) == {0: "active"}
