"""The real servers the tests run against (started by ``make servers``, see ``tests/servers/run.py``).

Tests find them through ``servers.json``: ``$MESHFED_TEST_SERVERS``, or else
``.servers/servers.json`` in the repository. A test that needs a real server
fails (never skips) when none is running: the real server is the point.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_STATE = REPO / ".servers" / "servers.json"


@dataclass(frozen=True)
class RealConsul:
    address: str
    management_token: str
    version: str


@dataclass(frozen=True)
class RealKubernetes:
    server: str
    ca_file: str
    admin_kubeconfig: str
    admin_token: str
    kubectl: str
    helm: str
    version: str


@dataclass(frozen=True)
class RealSpire:
    spire_server: str
    version: str


def _document() -> dict[str, Any]:
    path = Path(os.environ.get("MESHFED_TEST_SERVERS") or DEFAULT_STATE)
    if not path.exists():
        pytest.fail(f"the real servers are not running ({path} is missing): start them with `make servers`")
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def real_consul() -> RealConsul:
    consul = _document().get("consul")
    if not consul:
        pytest.fail("servers.json lists no Consul: did `make servers` fail? see .servers/consul.log")
    return RealConsul(consul["address"], consul["management_token"], consul["version"])


def real_kubernetes() -> RealKubernetes:
    document = _document()
    kube = document.get("kubernetes")
    if not kube:
        pytest.fail("servers.json lists no kube-apiserver: did `make servers` fail? see .servers/kube-apiserver.log")
    return RealKubernetes(
        server=kube["server"],
        ca_file=kube["ca_file"],
        admin_kubeconfig=kube["admin_kubeconfig"],
        admin_token=kube["admin_token"],
        kubectl=kube["kubectl"],
        helm=document["helm"],
        version=kube["version"],
    )


def real_spire() -> RealSpire:
    spire = _document().get("spire")
    if not spire:
        pytest.fail("servers.json lists no spire-server: did `make servers` fail to build it?")
    return RealSpire(spire["spire_server"], spire["version"])
