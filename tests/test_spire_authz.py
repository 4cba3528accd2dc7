"""A workload of a real SPIRE server calls a meshfed zone's ingress directly with its own SVID.

SPIRE's trust domain is federated by bundle only (no peering, no meshfed
gateway in it): authorization rules alone decide whether its workloads may
call. ``spire-server x509 mint`` issues the SVIDs, so the certificates are
SPIRE's own, not meshfed's idea of them.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from meshfed.catalog import EmbeddedCatalog, Endpoint, Service
from meshfed.federation.authz import AuthzRules
from meshfed.gateway.sni import service_sni
from meshfed.policy.authz import RuleSpec
from meshfed.runtime import assemble_zone
from meshfed.trust.bundle import parse_bundle
from meshfed.trust.spiffe import TrustDomain
from tests.conftest import eventually
from tests.spire import SpireServer, spire_server
from tests.test_e2e_federation import LOOPBACK
from tests.test_zero_trust import NAMESPACE, PORT, SERVICE, address_of, running_proxy_backend, tls_exchange

SPIRE_TD = TrustDomain("spire.test")


def spire_client(spire: SpireServer, spiffe_id: str, trusting_pem: str, directory: Path) -> ssl.SSLContext:
    """A TLS client presenting an SVID that SPIRE minted for ``spiffe_id``."""
    out = directory / spiffe_id.rsplit("/", 1)[-1]
    out.mkdir()
    spire.run("x509", "mint", "-spiffeID", spiffe_id, "-ttl", "1h", "-write", str(out))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # SPIFFE names are URI SANs; the zone's roots are the check
    context.load_verify_locations(cadata=trusting_pem)
    context.load_cert_chain(out / "svid.pem", out / "key.pem")
    return context


def test_a_spire_workload_is_admitted_only_when_a_rule_allows_it(make_zone, tmp_path):
    east = make_zone("east")
    with spire_server() as spire, running_proxy_backend(proxy_header=False) as backend:
        east.trust.import_bundle(parse_bundle(SPIRE_TD, spire.bundle()))
        with EmbeddedCatalog(east.directory) as catalog:
            catalog.register(
                Service(
                    name=SERVICE,
                    namespace=NAMESPACE,
                    ports={"tcp": PORT},
                    endpoints=[Endpoint(address="127.0.0.1", port=backend.address[1])],
                )
            )
        roots = east.trust.own_bundle().to_pem().decode()
        ops = spire_client(spire, "spiffe://spire.test/ns/ops/sa/job", roots, tmp_path)
        web = spire_client(spire, "spiffe://spire.test/ns/web/sa/frontend", roots, tmp_path)
        sni = service_sni(SERVICE, NAMESPACE, PORT, east.trust_domain)

        async def scenario() -> None:
            e = assemble_zone(east, LOOPBACK)
            await e.controller.start()
            try:
                ingress = address_of(e, "ingress")

                def call(context: ssl.SSLContext, payload: bytes) -> bytes | str:
                    return tls_exchange(ingress, context, payload, sni=sni)

                # Not exported and no rule: SPIRE's workloads have no route at all.
                assert await asyncio.to_thread(call, ops, b"early") != b"early"

                with AuthzRules(east.directory) as authz:
                    authz.add(
                        RuleSpec(
                            service=SERVICE, namespace=NAMESPACE, action="allow", id="spiffe://spire.test/ns/ops/*"
                        )
                    )
                await e.controller.exports_changed()

                assert await asyncio.to_thread(call, ops, b"allowed") == b"allowed"
                refused = await asyncio.to_thread(call, web, b"denied")
                assert "ACCESS_DENIED" in str(refused).upper(), refused
                assert backend.callers == [None]  # no --proxy-protocol: the backend sees no header

                def denied_counted() -> bool:
                    stats = e.controller.gateway_stats()["listeners"]["ingress"]
                    return bool(stats["denied_by_trust_domain"].get("spire.test"))

                await eventually(denied_counted, "the denial counted under spire.test")
            finally:
                await e.controller.stop()

        asyncio.run(scenario())
    assert bytes(backend.received) == b"allowed"
