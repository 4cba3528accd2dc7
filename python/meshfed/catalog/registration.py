"""A service as an operator registers it in the embedded catalog: the one definition of what is valid.

``meshfed service register`` parses its flags into a :class:`ServiceRegistration`
and ``POST /v1/services`` takes one as its body, so both refuse exactly the
same things: names that are not DNS labels, a port name given twice (flags and
JSON objects would silently keep the last), the same endpoint (address and
port) twice, weights and ports out of range. :meth:`ServiceRegistration.service`
then gives the catalog's :class:`~meshfed.catalog.model.Service`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from meshfed.catalog.model import Endpoint, IpAddress, Locality, Service, _dns_label, endpoint_key
from meshfed.errors import CatalogError
from meshfed.validation import describe_validation_error

# What one registration may hold (an API request's lists are bounded; see api/limits.py).
MAX_PORTS = 100
MAX_ENDPOINTS = 1000
MAX_LABELS = 64


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PortSpec(_Model):
    """One named port of the service (``--port http=8080``)."""

    name: Annotated[str, AfterValidator(lambda value: _dns_label(value, "port name"))]
    port: int = Field(ge=1, le=65535)


class EndpointSpec(_Model):
    """One instance (``--endpoint '10.0.0.5:8080;version=v2;weight=3'``)."""

    address: IpAddress = Field(description="An IP address.")
    port: int = Field(ge=1, le=65535)
    weight: int = Field(default=1, ge=1, le=1_000_000)
    healthy: bool = True
    locality: Locality = Locality()
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS)

    @property
    def key(self) -> str:
        return endpoint_key(self.address, self.port)


class ServiceRegistration(_Model):
    """A service and all its endpoints; registering it replaces what the catalog held under its name."""

    name: Annotated[str, AfterValidator(lambda value: _dns_label(value, "service name"))]
    namespace: Annotated[str, AfterValidator(lambda value: _dns_label(value, "namespace"))] = "default"
    ports: list[PortSpec] = Field(min_length=1, max_length=MAX_PORTS)
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS)
    endpoints: list[EndpointSpec] = Field(max_length=MAX_ENDPOINTS)

    @field_validator("ports")
    @classmethod
    def _unique_ports(cls, value: list[PortSpec]) -> list[PortSpec]:
        seen: set[str] = set()
        for port in value:
            if port.name in seen:
                raise ValueError(f"port name {port.name!r} is given twice; give each port once, with one number")
            seen.add(port.name)
        return value

    @field_validator("endpoints")
    @classmethod
    def _unique_endpoints(cls, value: list[EndpointSpec]) -> list[EndpointSpec]:
        seen: set[str] = set()
        for endpoint in value:
            if endpoint.key in seen:
                raise ValueError(f"endpoint {endpoint.key} is given twice; give each address and port once")
            seen.add(endpoint.key)
        return value

    def service(self, zone: str) -> Service:
        """The catalog's service, its endpoints placed in ``zone``."""
        return Service(
            name=self.name,
            namespace=self.namespace,
            ports={port.name: port.port for port in self.ports},
            labels=self.labels,
            endpoints=[
                Endpoint(
                    address=e.address,
                    port=e.port,
                    zone=zone,
                    locality=e.locality,
                    weight=e.weight,
                    healthy=e.healthy,
                    labels=e.labels,
                )
                for e in self.endpoints
            ],
        )


def not_embedded(zone: str, mode: str, what: str) -> str | None:
    """Why ``what`` (a command, an API call) cannot change the services of a zone whose catalog is ``mode``."""
    if mode == "embedded":
        return None
    where = {"consul": "in Consul (consul services register, or the agent's service definitions)"}.get(
        mode, "in Kubernetes (a Service with a selector, or your own EndpointSlices)"
    )
    return (
        f"zone {zone} reads its services from its {mode} catalog, which meshfed does not own, so {what} does not "
        f"apply; manage them {where}"
    )


def registration(**fields: object) -> ServiceRegistration:
    """A registration from plain values, refused with a :class:`CatalogError` naming the field."""
    try:
        return ServiceRegistration.model_validate(fields)
    except ValidationError as err:
        raise CatalogError(describe_validation_error(err)) from None


__all__ = ["EndpointSpec", "PortSpec", "ServiceRegistration", "not_embedded", "registration"]
