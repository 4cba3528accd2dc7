"""``meshfed explain``: one service's path on this zone, link by link, as ``GET /v1/explain/...`` serves it.

It walks the path in the order traffic takes it and names the first link that
is broken with what to do about it. On the exporting side: catalog → healthy
endpoints → export rule → peering → the peer applied the export →
authorization of a caller. On the importing side: peering → the peer's export
→ the import is served → its local address → the peer's gateway and SNI →
health at the peer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from meshfed.catalog.model import Service
from meshfed.diagnose.status import peering_problem
from meshfed.federation.authz import AuthzRules
from meshfed.federation.exports import ALL_PEERS, ExportRules
from meshfed.federation.imports import ImportedService, ImportStore, egress_listener_name
from meshfed.gateway.sni import service_sni
from meshfed.policy.authz import pattern_matches
from meshfed.trust.spiffe import TrustDomain

if TYPE_CHECKING:
    from meshfed.controller import Controller
    from meshfed.federation.peer_status import PeerStatus
    from meshfed.federation.service import PeeringService


class Step(BaseModel):
    step: str
    ok: bool
    detail: str
    fix: str = ""


class Explanation(BaseModel):
    """The path of one service on this zone; ``broken`` is the first step that is not ok."""

    zone: str
    service: str
    namespace: str
    role: Literal["exporter", "importer", "both", "unknown"]
    steps: list[Step]
    broken: Step | None


def explain(
    controller: Controller,
    peering: PeeringService | None,
    *,
    service: str,
    namespace: str = "default",
    peer: str | None = None,
    caller: str | None = None,
) -> Explanation:
    """Walk ``service.namespace`` on this zone (towards or from ``peer``), as a call by ``caller`` would."""
    zone = controller.zone
    peers = {status.name: status for status in (peering.peers() if peering is not None else [])}
    local = next(
        (s for s in controller.catalog_snapshot.services if s.name == service and s.namespace == namespace), None
    )
    with ImportStore(zone.directory) as store:
        imported = [
            item
            for item in store.services()
            if item.service.name == service
            and item.service.namespace == namespace
            and (peer is None or item.peer == peer)
        ]
    steps: list[Step] = []
    if local is not None:
        steps += _exporter_steps(controller, peers, local, peer, caller)
    if imported or (local is None and peer is not None):
        steps += _importer_steps(controller, peers, service, namespace, peer, imported)
    if not steps:
        steps.append(
            Step(
                step="service",
                ok=False,
                detail=f"{service}.{namespace} is neither in zone {zone.name}'s catalog nor imported from a peer",
                fix=f"register it here (meshfed service register --name {service} --namespace {namespace} ...), "
                "or name the peer that should export it with --peer",
            )
        )
    role: Literal["exporter", "importer", "both", "unknown"] = "unknown"
    if local is not None:
        role = "both" if imported else "exporter"
    elif imported or peer is not None:
        role = "importer"
    broken = next((step for step in steps if not step.ok), None)
    return Explanation(zone=zone.name, service=service, namespace=namespace, role=role, steps=steps, broken=broken)


def _exporter_steps(
    controller: Controller,
    peers: dict[str, PeerStatus],
    local: Service,
    peer: str | None,
    caller: str | None,
) -> list[Step]:
    zone = controller.zone
    steps = [
        Step(step="catalog", ok=True, detail=f"{local.name}.{local.namespace} is in the {zone.config.catalog} catalog")
    ]
    unhealthy = controller.unhealthy_endpoints
    healthy = [e for e in local.healthy_endpoints if (local.namespace, local.name, e.key) not in unhealthy]
    failing = sorted(e.key for e in local.endpoints if e not in healthy)
    steps.append(
        Step(
            step="endpoints",
            ok=bool(healthy),
            detail=f"{len(healthy)} of {len(local.endpoints)} endpoint(s) healthy (catalog and gateway health checks)"
            + (f"; failing: {', '.join(failing)}" if failing else ""),
            fix=""
            if healthy
            else "start a backend at an endpoint's address, or fix the registration; "
            "peers are told the service has no healthy endpoint until then",
        )
    )
    with ExportRules(zone.directory) as rules:
        exported_to = sorted({r.peer for r in rules.rules() if (r.namespace, r.service) == local.key})
    with AuthzRules(zone.directory) as authz:
        rules_of = [r for r in authz.rules() if (r.namespace, r.service) == local.key]
    targets = [peer] if peer is not None else sorted(p for p in peers if peers[p].state != "TERMINATED")
    if peer is not None or not rules_of:
        for name in targets or ["<no peer>"]:
            exported = name in exported_to or ALL_PEERS in exported_to
            steps.append(
                Step(
                    step=f"export to {name}",
                    ok=exported,
                    detail=f"exported to {', '.join(exported_to) or 'nobody'}",
                    fix=""
                    if exported
                    else f"meshfed export add --service {local.name} --namespace {local.namespace} --to {name}",
                )
            )
            status = peers.get(name)
            if status is None:
                if name != "<no peer>":
                    steps.append(
                        Step(
                            step=f"peering {name}",
                            ok=False,
                            detail=f"zone {zone.name} has no peering named {name}",
                            fix="meshfed peer token --peer NAME on one zone, meshfed peer establish on the other",
                        )
                    )
                continue
            problem = peering_problem(status)
            steps.append(
                Step(
                    step=f"peering {name}",
                    ok=not problem,
                    detail=f"{status.state}, connected {status.connected}, {status.exported_services} service(s) "
                    "exported to it" + (f": {problem}" if problem else ""),
                    fix=""
                    if not problem
                    else "check that the peer's zone runs and its peering address is reachable "
                    "(meshfed peer show), and the peer's logs for why it refuses updates",
                )
            )
    if caller is not None:
        steps.append(_authorization(controller, local, exported_to, peers, caller))
    return steps


def _authorization(
    controller: Controller, local: Service, exported_to: list[str], peers: dict[str, PeerStatus], caller: str
) -> Step:
    with AuthzRules(controller.zone.directory) as authz:
        rules = [r for r in authz.rules() if (r.namespace, r.service) == local.key]
    ports = sorted(set(local.ports.values()))
    if rules:
        decisions = []
        for port in ports:
            matched = next((r for r in rules if r.applies_to(port) and pattern_matches(r.pattern, caller)), None)
            if matched is None:
                decisions.append((port, False, "no rule matches, so it is denied"))
            else:
                decisions.append(
                    (port, matched.action == "allow", f"rule {matched.rule_id} ({matched.action} {matched.pattern})")
                )
        allowed = all(ok for _, ok, _ in decisions)
        detail = "; ".join(f"port {port}: {'allowed' if ok else 'denied'} by {why}" for port, ok, why in decisions)
        fix = (
            ""
            if allowed
            else f"meshfed authz add --service {local.name} --namespace {local.namespace} --allow {caller} --position 1"
        )
        return Step(step=f"authorization of {caller}", ok=allowed, detail=detail, fix=fix)
    domains = {
        peers[name].peer_trust_domain
        for name in peers
        if (name in exported_to or ALL_PEERS in exported_to) and peers[name].peer_trust_domain
    }
    caller_domain = caller.removeprefix("spiffe://").split("/", 1)[0]
    allowed = caller_domain in domains
    return Step(
        step=f"authorization of {caller}",
        ok=allowed,
        detail=f"no rules: any identity of {', '.join(sorted(d for d in domains if d)) or 'no trust domain'} may call "
        "(the trust domains of the peers it is exported to)",
        fix="" if allowed else "export it to the caller's zone, or add a rule: meshfed authz add --allow ...",
    )


def _importer_steps(
    controller: Controller,
    peers: dict[str, PeerStatus],
    service: str,
    namespace: str,
    peer: str | None,
    imported: list[ImportedService],
) -> list[Step]:
    """In the order a local client's call goes: the import, its local listener, the peering, the peer."""
    zone = controller.zone
    names = [peer] if peer is not None else sorted({item.peer for item in imported})
    bound = {name: f"{host}:{port}" for name, (host, port) in controller.egress_addresses().items()}
    steps: list[Step] = []
    for name in names:
        status = peers.get(name)
        if status is None:
            steps.append(
                Step(
                    step=f"peering {name}",
                    ok=False,
                    detail=f"zone {zone.name} has no peering named {name}",
                    fix="peer the zones: meshfed peer token on one, meshfed peer establish on the other",
                )
            )
            continue
        problem = peering_problem(status)
        peering_step = Step(
            step=f"peering {name}",
            ok=not problem,
            detail=f"{status.state}, connected {status.connected}" + (f": {problem}" if problem else ""),
            fix=""
            if not problem
            else f"check that zone {status.peer_zone or name} runs and is reachable at "
            f"{', '.join(status.peer_addresses) or 'its peering address'} (meshfed peer show --name {name})",
        )
        item = next((i for i in imported if i.peer == name), None)
        if item is None:
            # Nothing imported: either the peering is down, or the peer does not export it here.
            steps.append(peering_step)
            steps.append(
                Step(
                    step=f"import from {name}",
                    ok=False,
                    detail=f"{name} does not export {service}.{namespace} to zone {zone.name}",
                    fix=f"on {name}: meshfed export add --service {service} --namespace {namespace} --to "
                    f"<its peering name for {zone.name}>",
                )
            )
            continue
        steps.append(
            Step(
                step=f"import from {name}", ok=True, detail=f"{item.name} imported (version {status.received_version})"
            )
        )
        addresses = {
            port: bound[egress_listener_name(item, port)]
            for port in sorted(item.service.ports)
            if egress_listener_name(item, port) in bound
        }
        missing = sorted(set(item.service.ports) - addresses.keys())
        mode = controller.egress_policy.mode(service, namespace, name)
        listed = ", ".join(f"{port}: {address}" for port, address in addresses.items())
        steps.append(
            Step(
                step="local address",
                ok=not missing,
                detail=(listed or "no egress listener bound")
                + f" (workload TLS {mode})"
                + (f"; not bound: {', '.join(missing)}" if missing else ""),
                fix=""
                if not missing
                else (
                    controller.import_problem(name)
                    or problem
                    or "the gateway did not bind it: see /readyz and the zone's log for why"
                ),
            )
        )
        steps.append(peering_step)
        domain = TrustDomain.parse(item.origin.trust_domain)
        snis = [service_sni(service, namespace, port, domain) for port in sorted(set(item.service.ports.values()))]
        gateways = item.origin.gateway_addresses
        steps.append(
            Step(
                step="peer gateway",
                ok=bool(gateways),
                detail=f"{', '.join(gateways) or 'none advertised'}, SNI {', '.join(snis)}, "
                f"expecting {domain.gateway_id}",
                fix=""
                if gateways
                else f"zone {item.origin.zone} advertises no gateway address (meshfed up --gateway-advertise there)",
            )
        )
        healthy = item.service.healthy_endpoints > 0
        steps.append(
            Step(
                step=f"health at {name}",
                ok=healthy,
                detail=f"{item.service.healthy_endpoints} of {item.service.total_endpoints} endpoint(s) "
                f"healthy at {name}",
                fix=""
                if healthy
                else f"zone {item.origin.zone} has no live backend for it: check there "
                f"(meshfed explain {service} --namespace {namespace})",
            )
        )
    return steps


__all__ = ["Explanation", "Step", "explain"]
