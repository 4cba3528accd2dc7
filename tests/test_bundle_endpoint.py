"""The SPIFFE bundle endpoint in both profiles, and the poller that keeps federated bundles fresh.

Real TLS on loopback: a local web CA for ``https_web``, zone SVIDs for ``https_spiffe``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshfed.errors import BundleFetchError, TrustError
from meshfed.trust.bundle import parse_bundle
from meshfed.trust.endpoint import BundleEndpointServer, WebCertificate, endpoint_spiffe_id
from meshfed.trust.poller import BundlePoller
from meshfed.trust.spiffe import SpiffeId
from meshfed.zone import Zone


@dataclass
class WebPki:
    ca_pem: str
    server: WebCertificate


def _web_pki(directory: Path, name: str) -> WebPki:
    """A private web CA and a server certificate for 127.0.0.1, like a company's internal PKI."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} web CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}-web.pem", directory / f"{name}-web.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return WebPki(ca.public_bytes(serialization.Encoding.PEM).decode(), WebCertificate(cert_file, key_file))


class Changes:
    """An ``on_trust_changed`` callback that counts its calls."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> None:
        self.count += 1


def _spiffe_server(zone: Zone, spiffe_id: SpiffeId | None = None, bundle: Callable[[], bytes] | None = None):
    presented = spiffe_id or endpoint_spiffe_id(zone.trust_domain)
    return BundleEndpointServer(
        bundle or (lambda: zone.own_bundle().to_spiffe_json()),
        profile="https_spiffe",
        issue_svid=lambda: zone.issue_svid(presented, dt.timedelta(hours=1)),
    )


def _bootstrap(zone: Zone):
    return parse_bundle(zone.trust_domain, zone.own_bundle().to_spiffe_json())


async def _poll_once(consumer: Zone, changes: Changes) -> bool:
    poller = BundlePoller(consumer, changes)
    (federation,) = consumer.federations()
    return await poller.poll(federation)


def test_https_web_endpoint_serves_the_bundle_and_the_poller_stores_it_once(make_zone, tmp_path):
    east, west = make_zone("east"), make_zone("west")
    pki = _web_pki(tmp_path, "east")

    async def scenario() -> tuple[bool, bool, int]:
        server = BundleEndpointServer(
            lambda: east.own_bundle().to_spiffe_json(), profile="https_web", web_certificate=pki.server
        )
        await server.start()
        try:
            west.federate(east.trust_domain, server.url, "https_web", web_ca_pem=pki.ca_pem)
            changes = Changes()
            first = await _poll_once(west, changes)
            second = await _poll_once(west, changes)  # same sequence: nothing to do
            return first, second, changes.count
        finally:
            await server.stop()

    first, second, changed = asyncio.run(scenario())
    assert (first, second, changed) == (True, False, 1)
    stored = {s.bundle.trust_domain: s for s in west.trusted_bundles()}[east.trust_domain]
    assert stored.source == "federation"
    assert stored.bundle.fingerprints() == east.own_bundle().fingerprints()
    (federation,) = west.federations()
    assert federation.last_success_at is not None
    assert federation.last_error is None


def test_https_web_endpoint_with_a_certificate_from_an_untrusted_ca_is_refused(make_zone, tmp_path):
    east, west = make_zone("east"), make_zone("west")
    served, trusted = _web_pki(tmp_path, "east"), _web_pki(tmp_path, "other")

    async def scenario() -> None:
        server = BundleEndpointServer(
            lambda: east.own_bundle().to_spiffe_json(), profile="https_web", web_certificate=served.server
        )
        await server.start()
        try:
            west.federate(east.trust_domain, server.url, "https_web", web_ca_pem=trusted.ca_pem)
            with pytest.raises(BundleFetchError, match="server certificate refused"):
                await _poll_once(west, Changes())
        finally:
            await server.stop()

    asyncio.run(scenario())
    assert west.bundle_of(east.trust_domain) is None
    assert "server certificate refused" in (west.federations()[0].last_error or "")


def test_https_spiffe_follows_a_rotation_verifying_with_the_bootstrap_then_the_refreshed_bundle(make_zone):
    east, west = make_zone("east"), make_zone("west")
    old_root = east.own_bundle().fingerprints()[0]
    west.federate(
        east.trust_domain,
        "https://127.0.0.1:1/",  # replaced below once the server has its port
        "https_spiffe",
        endpoint_spiffe_id=endpoint_spiffe_id(east.trust_domain),
        bootstrap_bundle=_bootstrap(east),
    )

    async def poll_from(server: BundleEndpointServer, changes: Changes) -> bool:
        await server.start()
        try:
            # Re-pointing the relationship at the new port keeps the bundle held for east.
            west.federate(
                east.trust_domain, server.url, "https_spiffe", endpoint_spiffe_id=endpoint_spiffe_id(east.trust_domain)
            )
            return await _poll_once(west, changes)
        finally:
            await server.stop()

    changes = Changes()
    t0 = dt.datetime.now(dt.UTC)
    new_root = east.rotate(overlap=dt.timedelta(minutes=15), now=t0).root_fingerprint
    # The endpoint's SVID is still from the old CA: the bootstrap bundle authenticates it.
    assert asyncio.run(poll_from(_spiffe_server(east), changes))
    assert west.bundle_of(east.trust_domain).fingerprints() == [old_root, new_root]

    east.advance_rotation(now=t0 + dt.timedelta(minutes=15))
    east.advance_rotation(now=t0 + dt.timedelta(days=2))  # old root retired, sequence 3
    assert east.own_bundle().fingerprints() == [new_root]
    # The endpoint now presents an SVID from the new CA, which the bootstrap bundle does not
    # know: only the refreshed bundle (sequence 2) can authenticate it.
    assert asyncio.run(poll_from(_spiffe_server(east), changes))
    held = west.bundle_of(east.trust_domain)
    assert held.fingerprints() == [new_root]
    assert held.sequence == 3
    assert changes.count == 2


def test_https_spiffe_endpoint_presenting_another_spiffe_id_is_refused(make_zone):
    east, west = make_zone("east"), make_zone("west")
    impostor = SpiffeId.parse("spiffe://east.mesh/ns/default/sa/impostor")

    async def scenario() -> None:
        server = _spiffe_server(east, spiffe_id=impostor)
        await server.start()
        try:
            west.federate(
                east.trust_domain,
                server.url,
                "https_spiffe",
                endpoint_spiffe_id=endpoint_spiffe_id(east.trust_domain),
                bootstrap_bundle=_bootstrap(east),
            )
            before = west.bundle_of(east.trust_domain)
            with pytest.raises(
                BundleFetchError, match=r"not the pinned spiffe://east\.mesh/ns/meshfed-system/sa/controller"
            ):
                await _poll_once(west, Changes())
            assert west.bundle_of(east.trust_domain) == before
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_https_spiffe_endpoint_of_another_trust_domain_fails_verification(make_zone):
    east, west, rogue = make_zone("east"), make_zone("west"), make_zone("rogue")

    async def scenario() -> None:
        # rogue serves, presenting an ID in its own domain; west pinned east's endpoint with east's bundle.
        server = _spiffe_server(rogue, spiffe_id=endpoint_spiffe_id(rogue.trust_domain))
        await server.start()
        try:
            west.federate(
                east.trust_domain,
                server.url,
                "https_spiffe",
                endpoint_spiffe_id=endpoint_spiffe_id(east.trust_domain),
                bootstrap_bundle=_bootstrap(east),
            )
            with pytest.raises(BundleFetchError, match="server certificate refused"):
                await _poll_once(west, Changes())
        finally:
            await server.stop()

    asyncio.run(scenario())


def _bad_bundles(east: Zone) -> dict[str, bytes]:
    good = orjson.loads(east.own_bundle().to_spiffe_json())
    good["spiffe_sequence"] = 9
    der = bytearray(base64.b64decode(good["keys"][0]["x5c"][0]))
    der[-10] ^= 0xFF  # flip a bit inside the signature
    tampered = {**good, "keys": [{**good["keys"][0], "x5c": [base64.b64encode(bytes(der)).decode()]}]}
    leaf = east.issue_svid(SpiffeId.parse("spiffe://east.mesh/ns/default/sa/web"), dt.timedelta(hours=1)).leaf
    not_ca = {
        **good,
        "keys": [
            {**good["keys"][0], "x5c": [base64.b64encode(leaf.public_bytes(serialization.Encoding.DER)).decode()]}
        ],
    }
    full = orjson.dumps(good)
    return {
        "tampered": orjson.dumps(tampered),
        "truncated": full[: len(full) // 2],
        "malformed": b"<html>maintenance</html>",
        "ca_false": orjson.dumps(not_ca),
        "no_keys": b'{"spiffe_sequence": 10}',
    }


@pytest.mark.parametrize("kind", ["tampered", "truncated", "malformed", "ca_false", "no_keys"])
def test_a_bad_bundle_from_the_endpoint_is_refused_and_trust_is_unchanged(make_zone, kind):
    east, west = make_zone("east"), make_zone("west")
    bad = _bad_bundles(east)[kind]

    async def scenario() -> str:
        server = _spiffe_server(east, bundle=lambda: bad)
        await server.start()
        try:
            west.federate(
                east.trust_domain,
                server.url,
                "https_spiffe",
                endpoint_spiffe_id=endpoint_spiffe_id(east.trust_domain),
                bootstrap_bundle=_bootstrap(east),
            )
            before = west.trusted_bundles()
            changes = Changes()
            with pytest.raises(TrustError) as caught:
                await _poll_once(west, changes)
            assert west.trusted_bundles() == before
            assert changes.count == 0
            return str(caught.value)
        finally:
            await server.stop()

    message = asyncio.run(scenario())
    assert "\n" not in message
    assert "east.mesh" in message


def test_a_lower_sequence_is_ignored_and_logged(make_zone, caplog):
    east, west = make_zone("east"), make_zone("west")
    east.rotate(overlap=dt.timedelta(minutes=15))  # sequence 2 held by west below
    stale = orjson.loads(east.own_bundle().to_spiffe_json())
    stale["spiffe_sequence"] = 1

    async def scenario() -> bool:
        server = _spiffe_server(east, bundle=lambda: orjson.dumps(stale))
        await server.start()
        try:
            west.federate(
                east.trust_domain,
                server.url,
                "https_spiffe",
                endpoint_spiffe_id=endpoint_spiffe_id(east.trust_domain),
                bootstrap_bundle=_bootstrap(east),
            )
            return await _poll_once(west, Changes())
        finally:
            await server.stop()

    with caplog.at_level(logging.WARNING, logger="meshfed.trust.poller"):
        assert asyncio.run(scenario()) is False
    assert west.bundle_of(east.trust_domain).sequence == 2
    assert "lower than the 2 held; ignored" in caplog.text


def test_the_poller_service_polls_at_its_interval_and_reports_changes(make_zone):
    east, west = make_zone("east"), make_zone("west")

    async def scenario() -> int:
        server = _spiffe_server(east)
        await server.start()
        changes = Changes()
        poller = BundlePoller(west, changes, interval=dt.timedelta(milliseconds=20))
        try:
            west.federate(
                east.trust_domain,
                server.url,
                "https_spiffe",
                endpoint_spiffe_id=endpoint_spiffe_id(east.trust_domain),
                bootstrap_bundle=_bootstrap(east),
            )
            await poller.start()
            east.rotate(overlap=dt.timedelta(minutes=15))
            for _ in range(500):
                if changes.count:
                    break
                await asyncio.sleep(0.01)
            return changes.count
        finally:
            await poller.stop()
            await server.stop()

    assert asyncio.run(scenario()) == 1
    assert west.bundle_of(east.trust_domain).sequence == 2


def test_federate_refuses_incomplete_relationships(make_zone):
    east, west = make_zone("east"), make_zone("west")
    with pytest.raises(TrustError, match="must be an https:// URL"):
        west.federate(east.trust_domain, "http://127.0.0.1:1/", "https_web")
    with pytest.raises(TrustError, match="needs --endpoint-spiffe-id"):
        west.federate(east.trust_domain, "https://127.0.0.1:1/", "https_spiffe")
    with pytest.raises(TrustError, match="needs a bootstrap bundle"):
        west.federate(
            east.trust_domain,
            "https://127.0.0.1:1/",
            "https_spiffe",
            endpoint_spiffe_id=endpoint_spiffe_id(east.trust_domain),
        )
    with pytest.raises(TrustError, match="own trust domain"):
        west.federate(west.trust_domain, "https://127.0.0.1:1/", "https_web")
    assert west.federations() == []
