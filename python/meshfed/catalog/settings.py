"""Where a zone's catalog lives: the ``[consul]`` and ``[kubernetes]`` tables of ``zone.toml``.

::

    catalog = "consul"
    [consul]
    address = "http://127.0.0.1:8500"   # or https://...; CONSUL_HTTP_ADDR is not read: the zone says
    datacenter = "dc1"                   # optional: the agent's own datacenter otherwise
    token_file = "/etc/meshfed/consul-token"   # optional ACL token (a file, so it never sits in zone.toml)
    namespace = "team-a"                 # optional, Consul Enterprise
    partition = "eu"                     # optional, Consul Enterprise
    ca_file = "/etc/consul/ca.pem"       # optional TLS: CA, client certificate and key
    cert_file = "..."
    key_file = "..."

    catalog = "kubernetes"
    [kubernetes]
    namespaces = ["default", "shop"]     # watched for Services + EndpointSlices
    kubeconfig = "/home/me/.kube/config" # optional: in-cluster service account otherwise
    context = "prod"                     # optional kubeconfig context
    mirror_namespace = "meshfed-imports" # optional: mirrors go in the import's own namespace otherwise
    # optional, needs mirror_namespace: each mirror a Service selecting these pods (the zone's gateway
    # replicas, in mirror_namespace) on the import's egress port, not an EndpointSlice at one address
    mirror_selector = { "app.kubernetes.io/component" = "gateway" }

Kept apart from :mod:`meshfed.zone` so the zone module needs nothing but
pydantic from the catalog package.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CatalogMode = Literal["embedded", "consul", "kubernetes"]

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# A label key (an optional DNS-subdomain prefix and "/", then a name) and a label value, as the API server takes them.
_LABEL_KEY = re.compile(r"([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConsulSettings(_Settings):
    """How to reach the zone's Consul datacenter."""

    address: str = "http://127.0.0.1:8500"
    datacenter: str | None = None
    token_file: str | None = None
    namespace: str | None = None
    partition: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        if "//" not in value:
            value = f"http://{value}"
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"consul address {value!r} must look like http://HOST:PORT or https://HOST:PORT")
        try:
            parts.port  # noqa: B018 -- raises on a malformed port
        except ValueError:
            raise ValueError(f"consul address {value!r} has an invalid port") from None
        return value.rstrip("/")


class KubernetesSettings(_Settings):
    """How to reach the zone's Kubernetes API and which namespaces hold its services."""

    namespaces: list[str] = Field(default_factory=lambda: ["default"], min_length=1)
    kubeconfig: str | None = None
    context: str | None = None
    mirror_namespace: str | None = None
    mirror_selector: dict[str, str] | None = Field(default=None, min_length=1, max_length=16)

    @field_validator("namespaces")
    @classmethod
    def _check_namespaces(cls, value: list[str]) -> list[str]:
        for namespace in value:
            if not _DNS_LABEL.fullmatch(namespace):
                raise ValueError(f"kubernetes namespace {namespace!r} must be a DNS label")
        return sorted(set(value))

    @field_validator("mirror_namespace")
    @classmethod
    def _check_mirror_namespace(cls, value: str | None) -> str | None:
        if value is not None and not _DNS_LABEL.fullmatch(value):
            raise ValueError(f"kubernetes mirror_namespace {value!r} must be a DNS label")
        return value

    @field_validator("mirror_selector")
    @classmethod
    def _check_mirror_selector(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, label in (value or {}).items():
            if not (_LABEL_KEY.fullmatch(key) and _LABEL_VALUE.fullmatch(label)):
                raise ValueError(f"kubernetes mirror_selector {key!r} = {label!r} is not a label the API server takes")
        return value

    @model_validator(mode="after")
    def _selector_needs_namespace(self) -> KubernetesSettings:
        # A Service selects pods of its own namespace only: mirrors spread over the imports' namespaces
        # would select nothing.
        if self.mirror_selector is not None and self.mirror_namespace is None:
            raise ValueError("kubernetes mirror_selector needs mirror_namespace: the namespace of the pods it selects")
        return self


__all__ = ["CatalogMode", "ConsulSettings", "KubernetesSettings"]
