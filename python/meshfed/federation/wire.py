"""Conversions between :mod:`meshfed.federation.exchange` models and the protocol messages, and deltas."""

from __future__ import annotations

from meshfed.federation._proto import peering_pb2 as pb
from meshfed.federation.exchange import ExportedService, ServiceSnapshot


def service_to_proto(service: ExportedService) -> pb.ExportedService:
    return pb.ExportedService(
        name=service.name,
        namespace=service.namespace,
        ports=service.ports,
        labels=service.labels,
        healthy_endpoints=service.healthy_endpoints,
        total_endpoints=service.total_endpoints,
        subsets={key: pb.LabelValues(values=values) for key, values in service.subsets.items()},
    )


def service_from_proto(message: pb.ExportedService) -> ExportedService:
    return ExportedService(
        name=message.name,
        namespace=message.namespace,
        ports=dict(message.ports),
        labels=dict(message.labels),
        healthy_endpoints=message.healthy_endpoints,
        total_endpoints=message.total_endpoints,
        subsets={key: list(values.values) for key, values in message.subsets.items()},
    )


def snapshot_to_proto(snapshot: ServiceSnapshot) -> pb.Snapshot:
    return pb.Snapshot(
        version=snapshot.version,
        gateway_addresses=snapshot.gateway_addresses,
        services=[service_to_proto(service) for service in snapshot.services],
    )


def snapshot_from_proto(message: pb.Snapshot, zone: str, trust_domain: str) -> ServiceSnapshot:
    return ServiceSnapshot(
        zone=zone,
        trust_domain=trust_domain,
        gateway_addresses=list(message.gateway_addresses),
        version=message.version,
        services=[service_from_proto(service) for service in message.services],
    )


def same_content(a: ServiceSnapshot | None, b: ServiceSnapshot) -> bool:
    """Equal apart from the version (and order of services)."""
    return (
        a is not None
        and a.gateway_addresses == b.gateway_addresses
        and sorted(a.services, key=_key) == sorted(b.services, key=_key)
    )


def diff(old: ServiceSnapshot, new: ServiceSnapshot) -> pb.Delta:
    before = {service.key: service for service in old.services}
    after = {service.key: service for service in new.services}
    return pb.Delta(
        from_version=old.version,
        version=new.version,
        gateway_addresses=new.gateway_addresses,
        upserted=[service_to_proto(s) for key, s in sorted(after.items()) if before.get(key) != s],
        removed=[pb.ServiceKey(namespace=ns, name=name) for ns, name in sorted(before.keys() - after.keys())],
    )


def apply_delta(old: ServiceSnapshot, delta: pb.Delta) -> ServiceSnapshot:
    services = {service.key: service for service in old.services}
    for key in delta.removed:
        services.pop((key.namespace, key.name), None)
    for message in delta.upserted:
        service = service_from_proto(message)
        services[service.key] = service
    return old.model_copy(
        update={
            "version": delta.version,
            "gateway_addresses": list(delta.gateway_addresses),
            "services": [services[key] for key in sorted(services)],
        }
    )


def _key(service: ExportedService) -> tuple[str, str]:
    return service.key


__all__ = ["apply_delta", "diff", "same_content", "snapshot_from_proto", "snapshot_to_proto"]
