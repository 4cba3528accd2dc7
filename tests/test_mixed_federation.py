"""A mixed federation on the real servers: a zone on Consul, one on Kubernetes, one embedded, run as `meshfed up` does.

Each zone exports its own ``echo`` to both others; every zone then calls the
other two through its gateway's egress, and the imports show up where local
clients look: registered in the real Consul (with meshfed's ACL token of the
documented policy), mirrored as Services + EndpointSlices the real API server
admits. The Kubernetes zone's backend and egress sit on a veth pair into a
network namespace the test makes, because the API server refuses loopback
addresses in EndpointSlices.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshfed.catalog import ConsulSettings, EmbeddedCatalog, Endpoint, KubernetesSettings, Service
from meshfed.catalog.kubernetes_api import SERVICE_NAME_LABEL
from meshfed.federation.exports import ExportRules
from meshfed.runtime import ZoneRuntime, assemble_zone
from meshfed.zone import Zone
from tests.conftest import eventually, running_echo_server
from tests.servers import RealConsul, RealKubernetes, real_consul, real_kubernetes
from tests.test_catalog_consul import documented_policy
from tests.test_cli import meshfed_cli
from tests.test_e2e_federation import LOOPBACK, call


def _serves(runtime: ZoneRuntime, listener: str) -> bool:
    return listener in runtime.controller.gateway.addresses()


_ECHO = """
import socket, sys, threading
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
def serve(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


@dataclass(frozen=True)
class Netns:
    """A network namespace joined to this one by a veth pair: ``host`` here, ``inside`` there."""

    name: str
    host: str
    inside: str


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A namespace this test makes, for endpoints the API server accepts (it refuses loopback addresses)."""
    suffix = uuid.uuid4().hex[:6]
    octet = int(suffix[:2], 16) % 250 + 1
    space = Netns(f"meshfed-{suffix}", f"10.213.{octet}.1", f"10.213.{octet}.2")
    outside, inside = f"mfh{suffix}", f"mfn{suffix}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", space.name)
    try:
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", space.name)
        ip("addr", "add", f"{space.host}/30", "dev", outside)
        ip("link", "set", outside, "up")
        ip("-n", space.name, "addr", "add", f"{space.inside}/30", "dev", inside)
        ip("-n", space.name, "link", "set", inside, "up")
        ip("-n", space.name, "link", "set", "lo", "up")
        yield space
    finally:
        subprocess.run(["ip", "link", "del", outside], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", space.name], check=False, capture_output=True)


@contextlib.contextmanager
def echo_in(space: Netns, port: int) -> Iterator[tuple[str, int]]:
    process = subprocess.Popen(
        ["ip", "netns", "exec", space.name, sys.executable, "-c", _ECHO, space.inside, str(port)],
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"listening\n"
        yield space.inside, port
    finally:
        process.kill()
        process.wait()


def consul_call(consul: RealConsul, method: str, path: str, body: object = None) -> Any:
    response = httpx.request(
        method,
        f"{consul.address}{path}",
        headers={"X-Consul-Token": consul.management_token},
        content=None if body is None else json.dumps(body),
        timeout=10,
    )
    assert response.status_code == 200, f"{method} {path}: {response.status_code} {response.text}"
    return response.json()


def consul_token(consul: RealConsul, name: str, rules: str) -> str:
    """A new token with a policy of ``rules`` of its own."""
    policy = consul_call(consul, "PUT", "/v1/acl/policy", {"Name": name, "Rules": rules})
    token = consul_call(consul, "PUT", "/v1/acl/token", {"Policies": [{"ID": policy["ID"]}]})
    return str(token["SecretID"])


def kube_apply(kube: RealKubernetes, document: dict[str, Any]) -> None:
    result = subprocess.run(
        [kube.kubectl, "--kubeconfig", kube.admin_kubeconfig, "apply", "-f", "-"],
        input=json.dumps(document),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def kube_names(kube: RealKubernetes, kind: str, namespace: str, selector: str) -> set[str]:
    result = subprocess.run(
        [
            kube.kubectl,
            "--kubeconfig",
            kube.admin_kubeconfig,
            "get",
            kind,
            "-n",
            namespace,
            "-l",
            selector,
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_consul_kubernetes_and_embedded_zones_federate_on_the_real_servers(tmp_path: Path, netns: Netns):
    consul, kube = real_consul(), real_kubernetes()
    run = uuid.uuid4().hex[:6]
    names = {"consul": f"dc{run}", "kube": f"k8s{run}", "embedded": f"emb{run}"}
    namespace = f"mixed-{run}"
    kube_apply(kube, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    with running_echo_server() as local_echo, echo_in(netns, 7007) as (pod_host, pod_port):
        # Consul: the service as an agent-less catalog registration, with the management token.
        consul_call(
            consul,
            "PUT",
            "/v1/catalog/register",
            {
                "Node": f"node-{run}",
                "Address": "127.0.0.1",
                "Service": {
                    "ID": f"echo-{run}",
                    "Service": "echo",
                    "Address": "127.0.0.1",
                    "Port": local_echo.address[1],
                    "Meta": {"meshfed-port-name": "tcp"},
                },
            },
        )
        # Kubernetes: a selector-less Service and its EndpointSlice, at the address in the network namespace.
        kube_apply(
            kube,
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "echo", "namespace": namespace},
                "spec": {"ports": [{"name": "tcp", "port": 7, "targetPort": pod_port}]},
            },
        )
        kube_apply(
            kube,
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": "echo-1", "namespace": namespace, "labels": {SERVICE_NAME_LABEL: "echo"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [pod_host], "conditions": {"ready": True}}],
                "ports": [{"name": "tcp", "port": pod_port, "protocol": "TCP"}],
            },
        )
        token_file = tmp_path / "consul.token"
        imports = [f"echo-{names['kube']}", f"echo-{namespace}-{names['kube']}", f"echo-{names['embedded']}"]
        # Exactly the policy the docs tell operators to write, for this zone and these imports.
        policy = documented_policy(f"meshfed-{names['consul']}", imports)
        token_file.write_text(consul_token(consul, f"meshfed-{names['consul']}", policy))
        zones = {
            "consul": Zone.init(
                tmp_path / "c",
                names["consul"],
                f"{names['consul']}.mesh",
                catalog="consul",
                consul=ConsulSettings(address=consul.address, token_file=str(token_file)),
            ),
            "kube": Zone.init(
                tmp_path / "k",
                names["kube"],
                f"{names['kube']}.mesh",
                catalog="kubernetes",
                kubernetes=KubernetesSettings(
                    kubeconfig=kube.admin_kubeconfig, namespaces=[namespace], mirror_namespace=namespace
                ),
            ),
            "embedded": Zone.init(tmp_path / "e", names["embedded"], f"{names['embedded']}.mesh"),
        }
        with EmbeddedCatalog(zones["embedded"].directory) as catalog:
            catalog.register(
                Service(
                    name="echo", ports={"tcp": 7}, endpoints=[Endpoint(address="127.0.0.1", port=local_echo.address[1])]
                )
            )
        service_namespace = {"consul": "default", "kube": namespace, "embedded": "default"}
        for role, zone in zones.items():
            with ExportRules(zone.directory) as rules:
                rules.add("echo", service_namespace[role], [names[other] for other in zones if other != role])
        settings = dict.fromkeys(zones, LOOPBACK)
        # The Kubernetes zone's imports are mirrored at the host end of the veth: the API server admits that.
        settings["kube"] = replace(LOOPBACK, controller=replace(LOOPBACK.controller, egress_host=netns.host))

        async def scenario() -> None:
            runtimes = {role: assemble_zone(zone, settings[role]) for role, zone in zones.items()}
            for runtime in runtimes.values():
                await runtime.controller.start()
            try:
                for acceptor, dialer in (("consul", "kube"), ("consul", "embedded"), ("kube", "embedded")):
                    token = runtimes[acceptor].peering.issue_token(names[dialer]).encoded
                    await runtimes[dialer].peering.establish(token, names[acceptor])
                for caller, callee in itertools.permutations(zones, 2):
                    listener = f"egress:echo.{service_namespace[callee]}.{names[callee]}:tcp"
                    runtime = runtimes[caller]
                    await eventually(
                        functools.partial(_serves, runtime, listener), f"{caller} imports {callee}", timeout=20
                    )
                    payload = f"{caller} calls {callee}".encode()
                    assert await call(runtime, listener, payload) == payload

                # Imports registered in the real Consul, on meshfed's node, with its node meta.
                node = f"meshfed-{names['consul']}"

                def consul_imports() -> set[str]:
                    found = httpx.get(
                        f"{consul.address}/v1/catalog/node/{node}",
                        headers={"X-Consul-Token": consul.management_token},
                        timeout=5,
                    ).json()
                    return {entry["Service"] for entry in ((found or {}).get("Services") or {}).values()}

                await eventually(lambda: len(consul_imports()) == 2, "imports registered in Consul", timeout=20)
                meta = consul_call(consul, "GET", f"/v1/catalog/node/{node}")["Node"]["Meta"]
                assert meta["meshfed-managed"] == "true"
                # Mirrored in the real API server: a Service and an EndpointSlice per import, both admitted.
                mirror = f"meshfed.io/mirror=true,meshfed.io/owner={names['kube']}"
                await eventually(
                    lambda: (
                        len(kube_names(kube, "services", namespace, mirror)) == 2
                        and len(kube_names(kube, "endpointslices", namespace, mirror)) == 2
                    ),
                    "imports mirrored in Kubernetes",
                    timeout=20,
                )
                assert runtimes["kube"].controller.publication.ok
                assert runtimes["consul"].controller.publication.ok

                # Unexported from the embedded zone: its imports leave Consul and Kubernetes.
                with ExportRules(zones["embedded"].directory) as rules:
                    rules.remove("echo", "default")
                await eventually(lambda: len(consul_imports()) == 1, "embedded import deregistered", timeout=20)
                await eventually(
                    lambda: (
                        len(kube_names(kube, "services", namespace, mirror)) == 1
                        and len(kube_names(kube, "endpointslices", namespace, mirror)) == 1
                    ),
                    "embedded mirror removed",
                    timeout=20,
                )
            finally:
                for runtime in reversed(list(runtimes.values())):
                    await runtime.controller.stop()
                consul_call(consul, "PUT", "/v1/catalog/deregister", {"Node": f"node-{run}"})
                consul_call(consul, "PUT", "/v1/catalog/deregister", {"Node": f"meshfed-{names['consul']}"})

        asyncio.run(scenario())
    subprocess.run(
        [kube.kubectl, "--kubeconfig", kube.admin_kubeconfig, "delete", "namespace", namespace, "--wait=false"],
        check=False,
        capture_output=True,
    )


def test_a_consul_that_refuses_registration_leaves_the_zone_federating(tmp_path: Path):
    """The frozen-pipeline bug on the real Consul: a token without write rights refuses every import registration."""
    consul = real_consul()
    run = uuid.uuid4().hex[:6]
    dc, emb = f"dc{run}", f"emb{run}"
    read_only = 'service_prefix "" { policy = "read" }\nnode_prefix "" { policy = "read" }'
    token_file = tmp_path / "consul.token"
    token_file.write_text(consul_token(consul, f"read-only-{run}", read_only))
    with running_echo_server() as echo:
        consul_call(
            consul,
            "PUT",
            "/v1/catalog/register",
            {
                "Node": f"node-{run}",
                "Address": "127.0.0.1",
                "Service": {"ID": f"cart-{run}", "Service": f"cart{run}", "Port": echo.address[1]},
            },
        )
        consul_zone = Zone.init(
            tmp_path / "c",
            dc,
            f"{dc}.mesh",
            catalog="consul",
            consul=ConsulSettings(address=consul.address, token_file=str(token_file)),
        )
        embedded = Zone.init(tmp_path / "e", emb, f"{emb}.mesh")
        with EmbeddedCatalog(embedded.directory) as catalog:
            catalog.register(
                Service(name="web", ports={"tcp": 7}, endpoints=[Endpoint(address="127.0.0.1", port=echo.address[1])])
            )
        with ExportRules(embedded.directory) as rules:
            rules.add("web", "default", [dc])

        async def scenario() -> None:
            c, e = assemble_zone(consul_zone, LOOPBACK), assemble_zone(embedded, LOOPBACK)
            await c.controller.start()
            await e.controller.start()
            try:
                await c.peering.establish(e.peering.issue_token(dc).encoded, emb)
                listener = f"egress:web.default.{emb}:tcp"
                await eventually(functools.partial(_serves, c, listener), "the import served", timeout=20)
                assert await call(c, listener, b"served anyway") == b"served anyway"
                await eventually(lambda: not c.controller.publication.ok, "the refusal recorded", timeout=20)
                assert "Permission denied" in (c.controller.publication.last_error or "")
                # The zone's own export still reaches its peer after the refusal.
                with ExportRules(consul_zone.directory) as rules:
                    rules.add(f"cart{run}", "default", [emb])
                exported = f"egress:cart{run}.default.{dc}:default"  # no meshfed-port-name meta
                await eventually(functools.partial(_serves, e, exported), "the Consul zone's export", timeout=20)
                assert await call(e, exported, b"and exports") == b"and exports"
            finally:
                await e.controller.stop()
                await c.controller.stop()
                consul_call(consul, "PUT", "/v1/catalog/deregister", {"Node": f"node-{run}"})

        asyncio.run(scenario())


def test_catalog_list_reads_the_real_consul_and_kubernetes_catalogs(tmp_path: Path):
    consul, kube = real_consul(), real_kubernetes()
    run = uuid.uuid4().hex[:6]
    namespace = f"list-{run}"
    kube_apply(kube, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    kube_apply(
        kube,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"shop{run}", "namespace": namespace},
            "spec": {"ports": [{"name": "http", "port": 80}]},
        },
    )
    consul_call(
        consul,
        "PUT",
        "/v1/catalog/register",
        {"Node": f"node-{run}", "Address": "10.9.0.1", "Service": {"Service": f"cart{run}", "Port": 9090}},
    )
    token_file = tmp_path / "token"
    token_file.write_text(consul.management_token)
    try:
        consul_zone = Zone.init(
            tmp_path / "c",
            "c",
            "c.mesh",
            catalog="consul",
            consul=ConsulSettings(address=consul.address, token_file=str(token_file)),
        )
        kube_zone = Zone.init(
            tmp_path / "k",
            "k",
            "k.mesh",
            catalog="kubernetes",
            kubernetes=KubernetesSettings(kubeconfig=kube.admin_kubeconfig, namespaces=[namespace]),
        )
        for zone, expected in ((consul_zone, f"cart{run}.default"), (kube_zone, f"shop{run}.{namespace}")):
            for command in ("catalog", "service"):
                listed = meshfed_cli(command, "list", "--dir", zone.directory)
                assert listed.returncode == 0, listed.stderr
                assert expected in listed.stdout.decode()
    finally:
        consul_call(consul, "PUT", "/v1/catalog/deregister", {"Node": f"node-{run}"})
        subprocess.run(
            [kube.kubectl, "--kubeconfig", kube.admin_kubeconfig, "delete", "namespace", namespace, "--wait=false"],
            check=False,
            capture_output=True,
        )
