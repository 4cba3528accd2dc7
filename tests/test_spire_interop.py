"""meshfed federating with a real SPIRE server (built from the Go module proxy) over https_spiffe.

SPIRE's bundle endpoint is Go's net/http: a bundle over 2 KiB (two X.509
roots and SPIRE's JWT keys: every bundle during a rotation) arrives chunked.
meshfed must follow SPIRE through ``localauthority x509 prepare / activate /
taint / revoke``, authenticating the endpoint as ``spiffe://<td>/spire/server``
with the bundle it holds, and keep the trust it had whenever a poll fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from meshfed.trust.bundle import TrustBundle, parse_bundle
from meshfed.trust.endpoint import EndpointSpec, fetch_bundle
from meshfed.trust.poller import BundlePoller
from meshfed.trust.spiffe import SpiffeId, TrustDomain
from meshfed.zone import Zone
from tests.spire import SpireServer, spire_server

SPIRE_TD = TrustDomain("spire.test")


def _roots_of(document: bytes) -> set[str]:
    return set(_bundle(document).fingerprints())


def _bundle(document: bytes) -> TrustBundle:
    return parse_bundle(SPIRE_TD, document)


def _held_roots(zone: Zone) -> set[str]:
    held = zone.bundle_of(SPIRE_TD)
    assert held is not None
    return set(held.fingerprints())


async def _poll_until(zone: Zone, spire: SpireServer, check: Callable[[set[str]], bool], what: str) -> None:
    """Poll SPIRE's real endpoint until what meshfed holds passes ``check`` (SPIRE serves a new bundle
    within its own cache refresh, a few seconds)."""
    poller = BundlePoller(zone, _no_change)
    (federation,) = zone.federations()
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
    zone.federate(
        SPIRE_TD,
        spire.bundle_endpoint_url,
        "https_spiffe",
        endpoint_spiffe_id=SpiffeId.parse(spire.endpoint_spiffe_id),
        bootstrap_bundle=_bundle(spire.bundle()),
    )


def test_meshfed_follows_a_spire_ca_rotation_over_its_bundle_endpoint(make_zone):
    west = make_zone("west")
    with spire_server() as spire:
        _federate(west, spire)
        first = _roots_of(spire.bundle())
        assert len(first) == 1

        async def scenario() -> None:
            await _poll_until(west, spire, lambda held: held == first, "the first bundle")

            # A new X.509 authority is prepared: SPIRE now serves two roots (and its JWT keys), chunked.
            prepared = spire.json("localauthority", "x509", "prepare")["prepared_authority"]["authority_id"]
            both = _roots_of(spire.bundle())
            assert len(both) == 2
            await _poll_until(west, spire, lambda held: held == both, "both roots")

            # The new authority signs (SPIRE's endpoint SVID follows); meshfed still authenticates the endpoint.
            active = spire.json("localauthority", "x509", "show")["active"]["authority_id"]
            spire.run("localauthority", "x509", "activate", "-authorityID", prepared)
            assert spire.json("localauthority", "x509", "show")["active"]["authority_id"] == prepared
            await _poll_until(west, spire, lambda held: held == both, "both roots after activation")

            # The old authority is tainted and revoked: its root leaves SPIRE's bundle and meshfed's.
            spire.run("localauthority", "x509", "taint", "-authorityID", active)
            spire.run("localauthority", "x509", "revoke", "-authorityID", active)
            last = _roots_of(spire.bundle())
            assert len(last) == 1
            assert last < both
            assert last != first
            await _poll_until(west, spire, lambda held: held == last, "only the new root")

        asyncio.run(scenario())


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
