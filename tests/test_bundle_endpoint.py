"""The SPIFFE bundle endpoint in both profiles, and the poller that keeps federated bundles fresh.

Real TLS on loopback: a local web CA for ``https_web``, zone SVIDs for ``https_spiffe``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import logging
import ssl
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
from meshfed.trust.bundle import TrustBundle, parse_bundle
from meshfed.trust.ca import create_authority
from meshfed.trust.endpoint import MAX_REQUEST_HEAD, BundleEndpointServer, WebCertificate, endpoint_spiffe_id
from meshfed.trust.spiffe import SpiffeId, TrustDomain
from meshfed.zone import Zone
from meshfed.zone.bundle_poller import BundlePoller
from tests.test_trust_cli import meshfed_cli


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
        bundle or (lambda: zone.trust.own_bundle().to_spiffe_json()),
        profile="https_spiffe",
        issue_svid=lambda: zone.authority.issue_svid(presented, dt.timedelta(hours=1)),
    )


def _bootstrap(zone: Zone):
    return parse_bundle(zone.trust_domain, zone.trust.own_bundle().to_spiffe_json())


async def _poll_once(consumer: Zone, changes: Changes) -> bool:
    poller = BundlePoller(consumer, changes)
    (federation,) = consumer.trust.federations()
    return await poller.poll(federation)


def test_https_web_endpoint_serves_the_bundle_and_the_poller_stores_it_once(make_zone, tmp_path):
    east, west = make_zone("east"), make_zone("west")
    pki = _web_pki(tmp_path, "east")

    async def scenario() -> tuple[bool, bool, int]:
        server = BundleEndpointServer(
            lambda: east.trust.own_bundle().to_spiffe_json(), profile="https_web", web_certificate=pki.server
        )
        await server.start()
        try:
            west.trust.federate(east.trust_domain, server.url, "https_web", web_ca_pem=pki.ca_pem)
            changes = Changes()
            first = await _poll_once(west, changes)
            second = await _poll_once(west, changes)  # same sequence: nothing to do
            return first, second, changes.count
        finally:
            await server.stop()

    first, second, changed = asyncio.run(scenario())
    assert (first, second, changed) == (True, False, 1)
    stored = {s.bundle.trust_domain: s for s in west.trust.trusted_bundles()}[east.trust_domain]
    assert stored.source == "federation"
    assert stored.bundle.fingerprints() == east.trust.own_bundle().fingerprints()
    (federation,) = west.trust.federations()
    assert federation.last_success_at is not None
    assert federation.last_error is None


def test_a_request_head_over_the_cap_gets_nothing_and_the_endpoint_keeps_serving(make_zone, tmp_path):
    east = make_zone("east")
    pki = _web_pki(tmp_path, "east")

    async def scenario() -> tuple[bytes, bytes]:
        server = BundleEndpointServer(
            lambda: east.trust.own_bundle().to_spiffe_json(), profile="https_web", web_certificate=pki.server
        )
        await server.start()
        context = ssl.create_default_context(cadata=pki.ca_pem)
        try:
            host, port = server.url.removeprefix("https://").rstrip("/").rsplit(":", 1)

            async def ask(head: bytes) -> bytes:
                reader, writer = await asyncio.open_connection(host, int(port), ssl=context, server_hostname=host)
                writer.write(head)
                await writer.drain()
                answer = await reader.read()
                writer.close()
                return answer

            huge = b"GET / HTTP/1.1\r\nX-Filler: " + b"a" * MAX_REQUEST_HEAD + b"\r\n\r\n"
            return await ask(huge), await ask(b"GET / HTTP/1.1\r\nHost: east\r\n\r\n")
        finally:
            await server.stop()

    refused, served = asyncio.run(scenario())
    assert refused == b"", "a head over the cap is read no further and answered with nothing"
    assert served.startswith(b"HTTP/1.1 200"), served[:100]


def test_https_web_endpoint_with_a_certificate_from_an_untrusted_ca_is_refused(make_zone, tmp_path):
    east, west = make_zone("east"), make_zone("west")
    served, trusted = _web_pki(tmp_path, "east"), _web_pki(tmp_path, "other")

    async def scenario() -> None:
        server = BundleEndpointServer(
            lambda: east.trust.own_bundle().to_spiffe_json(), profile="https_web", web_certificate=served.server
        )
        await server.start()
        try:
            west.trust.federate(east.trust_domain, server.url, "https_web", web_ca_pem=trusted.ca_pem)
            with pytest.raises(BundleFetchError, match="server certificate refused"):
                await _poll_once(west, Changes())
        finally:
            await server.stop()

    asyncio.run(scenario())
    assert west.trust.bundle_of(east.trust_domain) is None
    assert "server certificate refused" in (west.trust.federations()[0].last_error or "")


def test_https_spiffe_follows_a_rotation_verifying_with_the_bootstrap_then_the_refreshed_bundle(make_zone):
    east, west = make_zone("east"), make_zone("west")
    old_root = east.trust.own_bundle().fingerprints()[0]
    west.trust.federate(
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
            west.trust.federate(
                east.trust_domain, server.url, "https_spiffe", endpoint_spiffe_id=endpoint_spiffe_id(east.trust_domain)
            )
            return await _poll_once(west, changes)
        finally:
            await server.stop()

    changes = Changes()
    t0 = dt.datetime.now(dt.UTC)
    new_root = east.authority.rotate(overlap=dt.timedelta(minutes=15), now=t0).root_fingerprint
    # The endpoint's SVID is still from the old CA: the bootstrap bundle authenticates it.
    assert asyncio.run(poll_from(_spiffe_server(east), changes))
    assert west.trust.bundle_of(east.trust_domain).fingerprints() == [old_root, new_root]

    east.authority.advance(now=t0 + dt.timedelta(minutes=15))
    east.authority.advance(now=t0 + dt.timedelta(days=2))  # old root retired, sequence 3
    assert east.trust.own_bundle().fingerprints() == [new_root]
    # The endpoint now presents an SVID from the new CA, which the bootstrap bundle does not
    # know: only the refreshed bundle (sequence 2) can authenticate it.
    assert asyncio.run(poll_from(_spiffe_server(east), changes))
    held = west.trust.bundle_of(east.trust_domain)
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
            west.trust.federate(
                east.trust_domain,
                server.url,
                "https_spiffe",
                endpoint_spiffe_id=endpoint_spiffe_id(east.trust_domain),
                bootstrap_bundle=_bootstrap(east),
            )
            before = west.trust.bundle_of(east.trust_domain)
            with pytest.raises(
                BundleFetchError, match=r"not the pinned spiffe://east\.mesh/ns/meshfed-system/sa/controller"
            ):
                await _poll_once(west, Changes())
            assert west.trust.bundle_of(east.trust_domain) == before
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
            west.trust.federate(
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
    good = orjson.loads(east.trust.own_bundle().to_spiffe_json())
    good["spiffe_sequence"] = 9
    der = bytearray(base64.b64decode(good["keys"][0]["x5c"][0]))
    der[-10] ^= 0xFF  # flip a bit inside the signature
    tampered = {**good, "keys": [{**good["keys"][0], "x5c": [base64.b64encode(bytes(der)).decode()]}]}
    leaf = east.authority.issue_svid(SpiffeId.parse("spiffe://east.mesh/ns/default/sa/web"), dt.timedelta(hours=1)).leaf
    not_ca = {
        **good,
        "keys": [
            {**good["keys"][0], "x5c": [base64.b64encode(leaf.public_bytes(serialization.Encoding.DER)).decode()]}
        ],
    }
    full = orjson.dumps(good)
    # A root of another trust domain (its URI SAN says so) served as east's: refused at parse.
    west_root = TrustBundle(TrustDomain("west.mesh"), (create_authority(TrustDomain("west.mesh")).authority.root,))
    foreign = {**good, "keys": orjson.loads(west_root.to_spiffe_json())["keys"]}
    return {
        "foreign_root": orjson.dumps(foreign),
        "tampered": orjson.dumps(tampered),
        "truncated": full[: len(full) // 2],
        "malformed": b"<html>maintenance</html>",
        "ca_false": orjson.dumps(not_ca),
        "no_keys": b'{"spiffe_sequence": 10}',
    }


@pytest.mark.parametrize("kind", ["tampered", "truncated", "malformed", "ca_false", "no_keys", "foreign_root"])
def test_a_bad_bundle_from_the_endpoint_is_refused_and_trust_is_unchanged(make_zone, kind):
    east, west = make_zone("east"), make_zone("west")
    bad = _bad_bundles(east)[kind]

    async def scenario() -> str:
        server = _spiffe_server(east, bundle=lambda: bad)
        await server.start()
        try:
            west.trust.federate(
                east.trust_domain,
                server.url,
                "https_spiffe",
                endpoint_spiffe_id=endpoint_spiffe_id(east.trust_domain),
                bootstrap_bundle=_bootstrap(east),
            )
            before = west.trust.trusted_bundles()
            changes = Changes()
            with pytest.raises(TrustError) as caught:
                await _poll_once(west, changes)
            assert west.trust.trusted_bundles() == before
            assert changes.count == 0
            return str(caught.value)
        finally:
            await server.stop()

    message = asyncio.run(scenario())
    assert "\n" not in message
    assert "east.mesh" in message


def test_a_lower_sequence_with_the_same_authorities_is_ignored_and_logged(make_zone, caplog):
    east, west = make_zone("east"), make_zone("west")
    east.authority.rotate(overlap=dt.timedelta(minutes=15))  # sequence 2 held by west below
    stale = orjson.loads(east.trust.own_bundle().to_spiffe_json())
    stale["spiffe_sequence"] = 1  # a lagging replica: the same roots, an older number

    async def scenario() -> bool:
        server = _spiffe_server(east, bundle=lambda: orjson.dumps(stale))
        await server.start()
        try:
            west.trust.federate(
                east.trust_domain,
                server.url,
                "https_spiffe",
                endpoint_spiffe_id=endpoint_spiffe_id(east.trust_domain),
                bootstrap_bundle=_bootstrap(east),
            )
            return await _poll_once(west, Changes())
        finally:
            await server.stop()

    with caplog.at_level(logging.WARNING, logger="meshfed.zone.bundle_poller"):
        assert asyncio.run(scenario()) is False
    assert west.trust.bundle_of(east.trust_domain).sequence == 2
    assert "lower than the 2 held, with the same authorities; ignored" in caplog.text


def _redeployed(zone: Zone, sequence: int, *, keep_current: bool) -> bytes:
    """``zone``'s domain as a redeployed endpoint serves it: numbering restarted at ``sequence``, other roots.

    ``keep_current`` keeps the root that signs today beside a new one (a SPIRE server with an upstream CA,
    redeployed on a fresh datastore: its endpoint SVID still chains to a root held); else only a new root.
    """
    fresh = create_authority(zone.trust_domain, generation=7).authority.root
    roots = (zone.authority.signing_ca().root, fresh) if keep_current else (fresh,)
    return TrustBundle(zone.trust_domain, roots, sequence=sequence).to_spiffe_json()


def test_a_sequence_reset_over_https_spiffe_is_taken_when_the_pinned_endpoint_serves_it(make_zone, caplog):
    east, west = make_zone("east"), make_zone("west")
    for _ in range(2):  # east's bundle moves to sequence 5 with two whole rotations (no SVID to outlive)
        east.authority.rotate(overlap=dt.timedelta(0))
        east.authority.advance()
    reset = _redeployed(east, 1, keep_current=True)

    async def scenario() -> tuple[bool, int]:
        server = _spiffe_server(east, bundle=lambda: reset)
        await server.start()
        try:
            west.trust.federate(
                east.trust_domain,
                server.url,
                "https_spiffe",
                endpoint_spiffe_id=endpoint_spiffe_id(east.trust_domain),
                bootstrap_bundle=_bootstrap(east),
            )
            changes = Changes()
            return await _poll_once(west, changes), changes.count
        finally:
            await server.stop()

    held_before = east.trust.own_bundle().sequence
    assert held_before == 5
    with caplog.at_level(logging.WARNING, logger="meshfed.zone.bundle_poller"):
        assert asyncio.run(scenario()) == (True, 1)
    held = west.trust.bundle_of(east.trust_domain)
    assert held.sequence == 1
    assert held.fingerprints() == parse_bundle(east.trust_domain, reset).fingerprints()
    warning = next(r for r in caplog.records if "sequence reset" in r.getMessage()).getMessage()
    assert "east.mesh" in warning
    assert "spiffe_sequence 1, lower than the 5 held" in warning
    assert "pinned spiffe://east.mesh/ns/meshfed-system/sa/controller" in warning


def test_a_sequence_reset_over_https_web_is_taken_and_a_later_fetch_follows_it(make_zone, tmp_path, caplog):
    east, west = make_zone("east"), make_zone("west")
    pki = _web_pki(tmp_path, "east")
    east.authority.rotate(overlap=dt.timedelta(0))  # sequence 2 held by west first
    served = [east.trust.own_bundle().to_spiffe_json()]

    async def scenario() -> list[bool]:
        server = BundleEndpointServer(lambda: served[0], profile="https_web", web_certificate=pki.server)
        await server.start()
        try:
            west.trust.federate(east.trust_domain, server.url, "https_web", web_ca_pem=pki.ca_pem)
            results = [await _poll_once(west, Changes())]
            served[0] = _redeployed(east, 1, keep_current=False)  # a fresh CA, numbering from 1
            results.append(await _poll_once(west, Changes()))
            served[0] = TrustBundle(
                east.trust_domain, parse_bundle(east.trust_domain, served[0]).roots, sequence=2
            ).to_spiffe_json()
            results.append(await _poll_once(west, Changes()))  # the same roots at 2: nothing new
            return results
        finally:
            await server.stop()

    with caplog.at_level(logging.WARNING, logger="meshfed.zone.bundle_poller"):
        assert asyncio.run(scenario()) == [True, True, True]
    held = west.trust.bundle_of(east.trust_domain)
    assert held.sequence == 2
    assert len(held.roots) == 1
    assert held.fingerprints()[0] not in east.trust.own_bundle().fingerprints()
    assert "served by 127.0.0.1, verified by the Web PKI (--web-ca)" in caplog.text


def test_a_lower_sequence_from_an_endpoint_that_is_not_the_pinned_one_changes_nothing(make_zone, caplog):
    """A reset is taken on the endpoint's authenticated word only: an impostor's lower sequence never lands."""
    east, west, rogue = make_zone("east"), make_zone("west"), make_zone("rogue")
    east.authority.rotate(overlap=dt.timedelta(0))

    async def scenario() -> None:
        server = _spiffe_server(
            rogue,
            spiffe_id=endpoint_spiffe_id(rogue.trust_domain),
            bundle=lambda: _redeployed(east, 1, keep_current=False),
        )
        await server.start()
        try:
            west.trust.federate(
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
    assert west.trust.bundle_of(east.trust_domain).sequence == 2
    assert "sequence reset" not in caplog.text


class FirstFetch:
    """Resolves when ``consumer``'s poller records its first successful fetch (it records every poll in
    state.db through ``Zone.trust.record_poll``, run in a thread: this wraps that one call to signal it)."""

    def __init__(self, consumer: Zone) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        record = consumer.trust.record_poll

        def recorded(trust_domain: TrustDomain, at: dt.datetime, error: str | None) -> None:
            record(trust_domain, at, error)
            if error is None:
                self._loop.call_soon_threadsafe(self._done.set)

        consumer.trust.record_poll = recorded  # type: ignore[method-assign]

    async def after(self, started: float, deadline: float = 10.0) -> float:
        """Seconds from ``started`` to the first successful fetch; fails after ``deadline``."""
        async with asyncio.timeout(deadline):
            await self._done.wait()
        return self._loop.time() - started


def test_a_federation_added_by_another_process_is_fetched_within_about_a_second(make_zone, tmp_path):
    """`meshfed trust federate` (a separate process) writes state.db; the running poller, waiting out a
    5-minute refresh, notices the new relationship and fetches at once."""
    east, west = make_zone("east"), make_zone("west")
    bootstrap = tmp_path / "east.bundle.json"
    bootstrap.write_bytes(east.trust.own_bundle().to_spiffe_json())

    async def scenario() -> float:
        server = _spiffe_server(east)
        await server.start()
        first_fetch = FirstFetch(west)
        poller = BundlePoller(west, Changes())
        await poller.start()
        try:
            # Nothing to poll yet: the poller settles into its default wait (5 minutes).
            result = await asyncio.to_thread(
                meshfed_cli,
                *("trust", "federate", "--dir", west.directory, "--trust-domain", "east.mesh"),
                *("--endpoint", server.url, "--profile", "https_spiffe"),
                *("--endpoint-spiffe-id", str(endpoint_spiffe_id(east.trust_domain))),
                *("--bootstrap-bundle", bootstrap),
            )
            written = asyncio.get_running_loop().time()
            assert result.returncode == 0, result.stderr.decode()
            return await first_fetch.after(written)
        finally:
            await poller.stop()
            await server.stop()

    latency = asyncio.run(scenario())
    assert latency < 2.0, f"first fetch {latency:.2f} s after the CLI wrote the federation"


def test_wake_fetches_a_new_federation_at_once_without_waiting_for_the_store_check(make_zone):
    """What POST /v1/trust/federations does in the zone's process (the store check is an hour here)."""
    east, west = make_zone("east"), make_zone("west")

    async def scenario() -> float:
        server = _spiffe_server(east)
        await server.start()
        first_fetch = FirstFetch(west)
        poller = BundlePoller(west, Changes(), store_check_interval=dt.timedelta(hours=1))
        await poller.start()
        try:
            await asyncio.sleep(0)  # let the first (empty) round run
            west.trust.federate(
                east.trust_domain,
                server.url,
                "https_spiffe",
                endpoint_spiffe_id=endpoint_spiffe_id(east.trust_domain),
                bootstrap_bundle=_bootstrap(east),
            )
            started = asyncio.get_running_loop().time()
            poller.wake()
            return await first_fetch.after(started)
        finally:
            await poller.stop()
            await server.stop()

    assert asyncio.run(scenario()) < 1.0


def test_the_poller_service_polls_at_its_interval_and_reports_changes(make_zone):
    east, west = make_zone("east"), make_zone("west")

    async def scenario() -> int:
        server = _spiffe_server(east)
        await server.start()
        changes = Changes()
        poller = BundlePoller(west, changes, interval=dt.timedelta(milliseconds=20))
        try:
            west.trust.federate(
                east.trust_domain,
                server.url,
                "https_spiffe",
                endpoint_spiffe_id=endpoint_spiffe_id(east.trust_domain),
                bootstrap_bundle=_bootstrap(east),
            )
            await poller.start()
            east.authority.rotate(overlap=dt.timedelta(minutes=15))
            for _ in range(500):
                if changes.count:
                    break
                await asyncio.sleep(0.01)
            return changes.count
        finally:
            await poller.stop()
            await server.stop()

    assert asyncio.run(scenario()) == 1
    assert west.trust.bundle_of(east.trust_domain).sequence == 2


def test_federate_refuses_incomplete_relationships(make_zone):
    east, west = make_zone("east"), make_zone("west")
    with pytest.raises(TrustError, match="must be an https:// URL"):
        west.trust.federate(east.trust_domain, "http://127.0.0.1:1/", "https_web")
    with pytest.raises(TrustError, match="needs --endpoint-spiffe-id"):
        west.trust.federate(east.trust_domain, "https://127.0.0.1:1/", "https_spiffe")
    with pytest.raises(TrustError, match="needs a bootstrap bundle"):
        west.trust.federate(
            east.trust_domain,
            "https://127.0.0.1:1/",
            "https_spiffe",
            endpoint_spiffe_id=endpoint_spiffe_id(east.trust_domain),
        )
    with pytest.raises(TrustError, match="own trust domain"):
        west.trust.federate(west.trust_domain, "https://127.0.0.1:1/", "https_web")
    assert west.trust.federations() == []
