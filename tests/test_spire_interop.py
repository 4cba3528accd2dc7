"""meshfed federating with a real SPIRE server (built from the Go module proxy), both ways.

meshfed consuming SPIRE (https_spiffe): SPIRE's bundle endpoint is Go's
net/http, so a bundle over 2 KiB (two X.509 roots and SPIRE's JWT keys: every
bundle during a rotation) arrives chunked. meshfed must follow SPIRE through
``localauthority x509 prepare / activate / taint / revoke``, twice,
authenticating the endpoint as ``spiffe://<td>/spire/server`` with the bundle
it holds, and take SPIRE's restart on a fresh datastore (its sequence back at
1) as the sequence reset it is.

SPIRE consuming meshfed (``meshfed up`` serving its bundle endpoint, over
https_web with a throwaway web CA, and over https_spiffe): SPIRE must hold
meshfed's roots through a meshfed rotation. Over https_spiffe, SPIRE's Go
crypto/x509 verifies the endpoint's SVID under meshfed's root and its URI
name constraints. SPIRE is made to fetch with ``spire-server federation
refresh`` (its own timer never runs more often than once a minute).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import httpx

from meshfed.errors import BundleFetchError
from meshfed.trust.bundle import TrustBundle, fingerprint, parse_bundle
from meshfed.trust.ca import certificates_to_pem, create_authority, private_key_to_pem
from meshfed.trust.endpoint import endpoint_spiffe_id
from meshfed.trust.endpoint_client import EndpointSpec, fetch_bundle
from meshfed.trust.spiffe import SpiffeId, TrustDomain
from meshfed.zone import Zone
from meshfed.zone.bundle_poller import BundlePoller
from tests.conftest import free_port
from tests.spire import SpireServer, spire_server
from tests.test_bundle_endpoint import _web_pki
from tests.test_zone_process import ZoneProcess, ephemeral_flags, init_zone, meshfed_cli

SPIRE_TD = TrustDomain("spire.test")
EAST_TD = TrustDomain("east.mesh")


def _roots_of(document: bytes) -> set[str]:
    return set(_bundle(document).fingerprints())


def _bundle(document: bytes) -> TrustBundle:
    return parse_bundle(SPIRE_TD, document)


def _held_roots(zone: Zone) -> set[str]:
    held = zone.trust.bundle_of(SPIRE_TD)
    assert held is not None
    return set(held.fingerprints())


async def _poll_until(zone: Zone, spire: SpireServer, check: Callable[[set[str]], bool], what: str) -> None:
    """Poll SPIRE's real endpoint until what meshfed holds passes ``check`` (SPIRE serves a new bundle
    within its own cache refresh, a few seconds)."""
    poller = BundlePoller(zone, _no_change)
    (federation,) = zone.trust.federations()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        await poller.poll(federation)
        if check(_held_roots(zone)):
            return
        assert loop.time() < deadline, (
            f"{what}: meshfed holds {len(_held_roots(zone))} root(s), SPIRE shows {spire.bundle()!r}"
        )
        # SPIRE refreshes what its endpoint serves on its own clock, which no test controls and which
        # gives no signal to wait on: poll the real endpoint again shortly (bounded by the deadline above).
        await asyncio.sleep(0.5)


async def _no_change() -> None:
    return None


def _federate(zone: Zone, spire: SpireServer) -> None:
    zone.trust.federate(
        SPIRE_TD,
        spire.bundle_endpoint_url,
        "https_spiffe",
        endpoint_spiffe_id=SpiffeId.parse(spire.endpoint_spiffe_id),
        bootstrap_bundle=_bundle(spire.bundle()),
    )


def test_meshfed_follows_a_spire_server_across_two_ca_rotations_over_its_bundle_endpoint(make_zone):
    west = make_zone("west")
    with spire_server() as spire:
        _federate(west, spire)
        first = _roots_of(spire.bundle())
        assert len(first) == 1

        async def rotation(before: set[str], number: int) -> set[str]:
            # A new X.509 authority is prepared: SPIRE now serves two roots (and its JWT keys), chunked.
            prepared = spire.json("localauthority", "x509", "prepare")["prepared_authority"]["authority_id"]
            both = _roots_of(spire.bundle())
            assert len(both) == 2
            assert before < both
            await _poll_until(west, spire, lambda held: held == both, f"rotation {number}: both roots")

            # The new authority signs (SPIRE's endpoint SVID follows); meshfed still authenticates the endpoint.
            active = spire.json("localauthority", "x509", "show")["active"]["authority_id"]
            spire.run("localauthority", "x509", "activate", "-authorityID", prepared)
            assert spire.json("localauthority", "x509", "show")["active"]["authority_id"] == prepared
            await _poll_until(west, spire, lambda held: held == both, f"rotation {number}: after activation")

            # The old authority is tainted: SPIRE re-signs its own SVID under the new one (its rotator runs
            # every 5 s), which an operator waits for before revoking; then its root leaves SPIRE's bundle
            # and meshfed's.
            spire.run("localauthority", "x509", "taint", "-authorityID", active)
            await _until_the_endpoint_chains_to(spire, both - before)
            spire.run("localauthority", "x509", "revoke", "-authorityID", active)
            last = _roots_of(spire.bundle())
            assert len(last) == 1
            assert last < both
            assert last != before
            await _poll_until(west, spire, lambda held: held == last, f"rotation {number}: only the new root")
            return last

        async def scenario() -> None:
            await _poll_until(west, spire, lambda held: held == first, "the first bundle")
            second = await rotation(first, 1)
            # The second rotation is authenticated only with what meshfed learned in the first: the
            # bootstrap root is long gone from SPIRE and from meshfed.
            assert not first & _held_roots(west)
            third = await rotation(second, 2)
            assert third.isdisjoint(first | second)

        asyncio.run(scenario())


async def _until_the_endpoint_chains_to(spire: SpireServer, roots: set[str]) -> None:
    """Until SPIRE's bundle endpoint presents an SVID under one of ``roots`` alone (SPIRE rotates it on its
    own clock and says nothing: fetch for real, shortly again, within a deadline)."""
    shown = _bundle(spire.bundle())
    only = TrustBundle(SPIRE_TD, tuple(root for root in shown.roots if fingerprint(root) in roots))
    spec = EndpointSpec(SPIRE_TD, spire.bundle_endpoint_url, "https_spiffe", SpiffeId.parse(spire.endpoint_spiffe_id))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        try:
            await fetch_bundle(spec, only, timeout=5)
            return
        except BundleFetchError:
            assert loop.time() < deadline, "SPIRE kept presenting an SVID of the tainted authority"
            await asyncio.sleep(0.5)


def _upstream_ca(directory: Path) -> tuple[Path, Path]:
    """A CA for SPIRE's ``disk`` UpstreamAuthority (made, and name-constrained to spire.test, by meshfed's CA)."""
    new = create_authority(SPIRE_TD)
    cert, key = directory / "upstream.pem", directory / "upstream.key"
    cert.write_bytes(certificates_to_pem([new.authority.root])[0])
    key.write_bytes(private_key_to_pem(new.root_key))
    return cert, key


def test_meshfed_takes_the_sequence_reset_of_a_spire_server_on_a_fresh_datastore(make_zone, tmp_path, caplog):
    """SPIRE behind an upstream CA keeps its root across a lost datastore, but starts its bundle again at
    sequence 1 with new JWT keys: the endpoint still authenticates (its SVID chains to the held root), so
    meshfed takes the lower sequence instead of ignoring SPIRE forever."""
    west = make_zone("west")
    with spire_server(upstream=_upstream_ca(tmp_path)) as spire:
        _federate(west, spire)
        spire.run("localauthority", "jwt", "prepare")  # a new JWT key: sequence 2
        raised = _bundle(spire.bundle())
        assert raised.sequence == 2

        def at(sequence: int) -> bool:
            held = west.trust.bundle_of(SPIRE_TD)
            return held is not None and held.sequence == sequence

        async def poll_until_sequence(sequence: int, what: str) -> TrustBundle:
            await _poll_until(west, spire, lambda _: at(sequence), what)
            held: TrustBundle | None = west.trust.bundle_of(SPIRE_TD)
            assert held is not None
            return held

        before = asyncio.run(poll_until_sequence(2, "sequence 2"))
        assert before.same_content(raised)

        spire.restart(fresh_datastore=True)
        reset = _bundle(spire.bundle())
        assert reset.sequence == 1
        assert reset.fingerprints() == raised.fingerprints()  # the upstream root: unchanged
        assert not reset.same_content(raised)  # the JWT keys: new
        with caplog.at_level(logging.WARNING, logger="meshfed.zone.bundle_poller"):
            after = asyncio.run(poll_until_sequence(1, "the reset bundle"))
        assert after.same_content(reset)
        warning = next(r.getMessage() for r in caplog.records if "sequence reset" in r.getMessage())
        assert "spire.test" in warning
        assert "spiffe_sequence 1, lower than the 2 held" in warning


# -- SPIRE consuming meshfed's bundle endpoint -----------------------------------------------------------------


def _spire_holds(spire: SpireServer) -> set[str]:
    held = spire.federated_bundle(EAST_TD.name)
    assert held is not None, "SPIRE holds no bundle of east.mesh"
    return set(parse_bundle(EAST_TD, held).fingerprints())


def _meshfed_roots(east: Path) -> set[str]:
    return set(Zone.open(east).trust.own_bundle().fingerprints())


def _refresh(spire: SpireServer) -> None:
    spire.run("federation", "refresh", "-id", f"spiffe://{EAST_TD}")


def _rotate(east: Path, *flags: str) -> None:
    result = meshfed_cli("trust", "rotate", "--dir", east, *flags)
    assert result.returncode == 0, result.stderr


def _spire_follows_a_meshfed_rotation(spire: SpireServer, east: Path) -> None:
    """Through ``trust rotate`` and an early ``--finish``: SPIRE holds meshfed's roots at each step."""
    first = _meshfed_roots(east)
    _refresh(spire)
    assert _spire_holds(spire) == first

    _rotate(east, "--overlap", "1h")
    both = _meshfed_roots(east)
    assert len(both) == 2
    _refresh(spire)
    assert _spire_holds(spire) == both

    # The emergency finish through the running zone's API: it renews the endpoint's SVID before answering.
    finished = httpx.post(
        f"{Zone.open(east).directory.joinpath('api-url').read_text().strip()}/v1/trust/rotate",
        json={"finish": True},
        headers={"Authorization": f"Bearer {Zone.open(east).admin_token()}"},
        timeout=30,
    )
    assert finished.status_code == 200, finished.text
    last = _meshfed_roots(east)
    assert len(last) == 1
    assert last < both
    _refresh(spire)  # SPIRE still holds both roots: whichever SVID the endpoint presents verifies
    assert _spire_holds(spire) == last
    # Now SPIRE trusts the new root alone: over https_spiffe it takes the endpoint only because that already
    # presents an SVID of the new CA.
    _refresh(spire)
    assert _spire_holds(spire) == last


def test_spire_federates_with_meshfed_over_https_web_through_a_meshfed_rotation(tmp_path):
    east = init_zone(tmp_path / "east")
    pki = _web_pki(tmp_path, "east")
    roots = tmp_path / "web-ca.pem"
    roots.write_text(pki.ca_pem)
    port = free_port()
    zone = ZoneProcess(
        east,
        [
            *ephemeral_flags(),
            *("--bundle-endpoint-address", f"127.0.0.1:{port}"),
            *("--bundle-endpoint-web-cert", str(pki.server.cert_chain_file)),
            *("--bundle-endpoint-web-key", str(pki.server.key_file)),
        ],
    )
    try:
        zone.wait_serving()
        with spire_server(web_roots=roots) as spire:
            spire.run(
                *("federation", "create", "-trustDomain", EAST_TD.name),
                *("-bundleEndpointURL", f"https://127.0.0.1:{port}/", "-bundleEndpointProfile", "https_web"),
            )
            _spire_follows_a_meshfed_rotation(spire, east)
    finally:
        assert zone.stop() == 0


def test_spire_federates_with_meshfed_over_https_spiffe_through_a_meshfed_rotation(tmp_path):
    east = init_zone(tmp_path / "east")
    bootstrap = tmp_path / "east.bundle.json"
    bootstrap.write_bytes(Zone.open(east).trust.own_bundle().to_spiffe_json())
    port = free_port()
    zone = ZoneProcess(east, [*ephemeral_flags(), "--bundle-endpoint-address", f"127.0.0.1:{port}"])
    try:
        zone.wait_serving()
        with spire_server() as spire:
            spire.run(
                *("federation", "create", "-trustDomain", EAST_TD.name),
                *("-bundleEndpointURL", f"https://127.0.0.1:{port}/", "-bundleEndpointProfile", "https_spiffe"),
                *("-endpointSpiffeID", str(endpoint_spiffe_id(EAST_TD))),
                *("-trustDomainBundlePath", str(bootstrap), "-trustDomainBundleFormat", "spiffe"),
            )
            _spire_follows_a_meshfed_rotation(spire, east)
    finally:
        assert zone.stop() == 0


def test_the_bundle_spire_serves_during_a_rotation_is_read_whole():
    """The body SPIRE chunks: what meshfed fetches equals what ``spire-server bundle show`` prints."""
    with spire_server() as spire:
        spire.run("localauthority", "x509", "prepare")
        shown = spire.bundle()
        assert len(shown) > 2048  # over SPIRE's chunking threshold
        spec = EndpointSpec(
            SPIRE_TD, spire.bundle_endpoint_url, "https_spiffe", SpiffeId.parse(spire.endpoint_spiffe_id), None
        )
        fetched = asyncio.run(fetch_bundle(spec, _bundle(shown)))
        assert set(fetched.fingerprints()) == _roots_of(shown)
        assert len(fetched.roots) == 2
