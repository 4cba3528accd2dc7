"""Conversions between :mod:`meshfed.federation.exchange` models and the protocol messages, and deltas.

Inbound conversions are the parse step at the stream's edge: a message from a
peer becomes validated models or a :class:`PeerInputError` naming the first
field that broke a rule (``snapshot.services[3].ports.http: ...``); nothing
partial comes out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from meshfed.errors import PeerInputError
from meshfed.federation._proto import peering_pb2 as pb
from meshfed.federation.exchange import MAX_SERVICES, ExportedService, ServiceSnapshot

_M = TypeVar("_M")


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


def _service_fields(message: pb.ExportedService) -> dict[str, Any]:
    return {
        "name": message.name,
        "namespace": message.namespace,
        "ports": dict(message.ports),
        "labels": dict(message.labels),
        "healthy_endpoints": message.healthy_endpoints,
        "total_endpoints": message.total_endpoints,
        "subsets": {key: list(values.values) for key, values in message.subsets.items()},
    }


def service_from_proto(message: pb.ExportedService, where: str = "service") -> ExportedService:
    return _parse(ExportedService, _service_fields(message), where)


def snapshot_to_proto(snapshot: ServiceSnapshot) -> pb.Snapshot:
    return pb.Snapshot(
        version=snapshot.version,
        epoch=snapshot.epoch,
        gateway_addresses=snapshot.gateway_addresses,
        services=[service_to_proto(service) for service in snapshot.services],
    )


def snapshot_from_proto(message: pb.Snapshot, zone: str, trust_domain: str) -> ServiceSnapshot:
    """A peer's full snapshot as a validated model, or PeerInputError naming the bad field."""
    fields = {
        "zone": zone,
        "trust_domain": trust_domain,
        "gateway_addresses": list(message.gateway_addresses),
        "version": message.version,
        "epoch": message.epoch,
        "services": [_service_fields(service) for service in message.services],
    }
    return _parse(ServiceSnapshot, fields, "snapshot")


def same_content(a: ServiceSnapshot | None, b: ServiceSnapshot) -> bool:
    """Equal apart from the version (and order of services)."""
    if a is None or a.gateway_addresses != b.gateway_addresses or len(a.services) != len(b.services):
        return False
    # Snapshots of one zone share the summaries of unchanged services, in catalog order: one pass
    # by identity settles the common cases of 10,000 services (nothing changed; one did) without a sort.
    for x, y in zip(a.services, b.services, strict=True):
        if x is not y:
            if x.key != y.key:
                return sorted(a.services, key=_key) == sorted(b.services, key=_key)  # another order
            if x != y:
                return False
    return True


def diff(old: ServiceSnapshot, new: ServiceSnapshot) -> pb.Delta:
    """What turns ``old`` into ``new``: the services added or changed, and the keys removed."""
    upserted, removed = _changed_in_place(old.services, new.services) or _changed(old.services, new.services)
    return pb.Delta(
        from_version=old.version,
        version=new.version,
        epoch=new.epoch,
        gateway_addresses=new.gateway_addresses,
        upserted=[service_to_proto(s) for s in upserted],
        removed=[pb.ServiceKey(namespace=ns, name=name) for ns, name in removed],
    )


_Changes = tuple[list[ExportedService], list[tuple[str, str]]]


def _changed_in_place(old: list[ExportedService], new: list[ExportedService]) -> _Changes | None:
    """The changes when ``new`` holds the same keys in the same order (no service came or went), else None.

    Snapshots of one zone share the summaries of unchanged services: one pass by identity, then a
    comparison for the few that differ, instead of two maps of 10,000 services.
    """
    if len(old) != len(new):
        return None
    upserted = []
    for before, after in zip(old, new, strict=True):
        if before is after:
            continue
        if before.key != after.key:
            return None
        if before != after:
            upserted.append(after)
    return sorted(upserted, key=_key), []


def _changed(old: list[ExportedService], new: list[ExportedService]) -> _Changes:
    before = {service.key: service for service in old}
    after = {service.key: service for service in new}
    upserted = [s for key, s in sorted(after.items()) if not _same(before.get(key), s)]
    return upserted, sorted(before.keys() - after.keys())


def _same(a: ExportedService | None, b: ExportedService) -> bool:
    return a is b or a == b


def apply_delta(old: ServiceSnapshot, delta: pb.Delta) -> ServiceSnapshot:
    """``old`` with a peer's delta applied, validated whole (counts, addresses, version), or PeerInputError."""
    services = {service.key: service for service in old.services}
    for key in delta.removed:
        services.pop((key.namespace, key.name), None)
    for index, message in enumerate(delta.upserted):
        service = service_from_proto(message, f"delta.upserted[{index}]")
        services[service.key] = service
    header = {
        **old.model_dump(include={"zone", "trust_domain"}),
        "version": delta.version,
        "epoch": delta.epoch,
        "gateway_addresses": list(delta.gateway_addresses),
    }
    checked = _parse(ServiceSnapshot, header, "delta")
    if len(services) > MAX_SERVICES:
        raise PeerInputError(f"delta: the peer's exports would hold {len(services)} services, more than {MAX_SERVICES}")
    # One per key (the map), each checked when it came (the held ones before, the upserted above):
    # only the header is validated again, not 10,000 services.
    return checked.model_copy(update={"services": [services[key] for key in sorted(services)]})


# One validator per type parsed from the wire (models and dataclasses alike), built once.
_ADAPTERS: dict[type[Any], TypeAdapter[Any]] = {}


def _parse(model: type[_M], fields: Mapping[str, Any], where: str) -> _M:
    adapter: TypeAdapter[_M] | None = _ADAPTERS.get(model)
    if adapter is None:
        adapter = _ADAPTERS[model] = TypeAdapter(model)
    try:
        return adapter.validate_python(fields)
    except ValidationError as err:
        raise PeerInputError(_describe(err, where)) from None


def _describe(err: ValidationError, where: str) -> str:
    """The first broken rule as ``where.field[3].name: message``, bounded so a hostile value is not echoed."""
    first = err.errors(include_url=False, include_input=False)[0]
    path = where
    for part in first["loc"]:
        path += f"[{part}]" if isinstance(part, int) else f".{str(part)[:64]}"
    more = err.error_count() - 1
    suffix = f" (and {more} more)" if more else ""
    return f"{path}: {first['msg'][:200]}{suffix}"


def _key(service: ExportedService) -> tuple[str, str]:
    return service.key


__all__ = ["apply_delta", "diff", "same_content", "snapshot_from_proto", "snapshot_to_proto"]
