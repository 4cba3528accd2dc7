"""The catalog model shared by every source (DESIGN §4).

A :class:`Service` is a name in a namespace with named ports; its
:class:`Endpoint` s carry their zone, locality, weight and health. Subsets are
label selectors over endpoint labels (``version=v2``).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _dns_label(value: str, what: str) -> str:
    if not _DNS_LABEL.fullmatch(value):
        # Cut what is echoed: the value may come from a peer and be megabytes long.
        raise ValueError(f"{what} {value[:80]!r} must be a DNS label: lowercase letters, digits and '-', at most 63")
    return value


# A service, namespace or port name: a DNS label (RFC 1123), as every catalog and the SNI need.
DnsLabel = Annotated[str, AfterValidator(lambda value: _dns_label(value, "name"))]


def _ip_address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"endpoint address {value[:80]!r} must be an IP address") from None


# An endpoint's address: an IP literal, in its canonical text form.
IpAddress = Annotated[str, AfterValidator(_ip_address)]


def endpoint_key(address: str, port: int) -> str:
    """``address:port`` (IPv6 in brackets): an endpoint's identity within a service."""
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Endpoints are what a catalog holds most of (100,000 in a zone of 10,000 services): as validated,
# slotted, frozen dataclasses they take about a fifth of the memory of models (no per-instance
# __dict__ or fields-set), and the defaults are shared. Change one with dataclasses.replace.
_VALUE = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True, config=_VALUE)
class Locality:
    region: str = ""
    zone: str = ""


@dataclass(frozen=True, slots=True, config=_VALUE)
class Endpoint:
    """One instance of a service: an IP address and port, with its placement and health."""

    address: IpAddress
    port: int = Field(ge=1, le=65535)
    zone: str = ""
    locality: Locality = Locality()
    weight: int = Field(default=1, ge=1, le=1_000_000)
    healthy: bool = True
    labels: dict[str, str] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        """``address:port``, unique within a service."""
        return endpoint_key(self.address, self.port)

    def matches(self, selector: dict[str, str]) -> bool:
        """True if every label of ``selector`` is on this endpoint (a subset selector)."""
        return all(self.labels.get(key) == value for key, value in selector.items())


class Service(_Model):
    """A service with its ports and endpoints."""

    name: str
    namespace: str = "default"
    ports: dict[str, int] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    endpoints: list[Endpoint] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _dns_label(value, "service name")

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        return _dns_label(value, "namespace")

    @field_validator("ports")
    @classmethod
    def _check_ports(cls, value: dict[str, int]) -> dict[str, int]:
        for name, number in value.items():
            _dns_label(name, "port name")
            if not 1 <= number <= 65535:
                raise ValueError(f"port {name}={number} is outside 1-65535")
        return value

    @property
    def key(self) -> tuple[str, str]:
        """(namespace, name): unique within a zone."""
        return self.namespace, self.name

    @property
    def healthy_endpoints(self) -> list[Endpoint]:
        return [endpoint for endpoint in self.endpoints if endpoint.healthy]


class LocalImport(_Model):
    """An imported service as local clients reach it: through this zone's gateway egress."""

    peer: str
    service: str
    namespace: str
    # Port name -> (host, port) of the egress listener serving it.
    ports: dict[str, tuple[str, int]]

    @property
    def name(self) -> str:
        """``<service>.<namespace>.<peer>``."""
        return f"{self.service}.{self.namespace}.{self.peer}"


class CatalogSnapshot(_Model):
    """Every service of a source at one version. Versions only grow."""

    version: int
    services: list[Service]

    def service(self, namespace: str, name: str) -> Service | None:
        return next((s for s in self.services if s.key == (namespace, name)), None)
