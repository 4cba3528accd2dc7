"""A mixed federation: one zone on Consul, one on Kubernetes, one embedded — each assembled as `meshfed up` does.

Each zone exports its own ``echo`` to both others; every zone then calls the
other two through its gateway's egress, and the imports show up where local
clients look: registered in Consul, mirrored as Kubernetes Services.
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
from meshfed.catalog.kubernetes import MIRROR_LABEL, OWNER_LABEL, SERVICE_NAME_LABEL
from meshfed.federation.exports import ExportRules
from meshfed.runtime import ZoneRuntime, assemble_zone
from meshfed.zone import Zone
from tests.conftest import EchoServer, eventually, running_echo_server
from tests.doubles.consul import ConsulDouble
from tests.doubles.kubernetes import KubernetesDouble, endpoint_slice, service
from tests.servers import REPO, RealConsul, RealKubernetes, real_consul, real_kubernetes
from tests.test_e2e_federation import LOOPBACK, call

# The ACL policy the README tells Consul operators to write; the real-server test runs with exactly it.
CONSUL_POLICY = REPO / "helm" / "meshfed" / "examples" / "consul-acl-policy.hcl"


def _serves(runtime: ZoneRuntime, listener: str) -> bool:
    return listener in runtime.controller.gateway.addresses()


def test_consul_kubernetes_and_embedded_zones_call_each_other(tmp_path: Path, echo_server: EchoServer):
    port = echo_server.address[1]
    with ConsulDouble() as consul, KubernetesDouble() as kube:
        consul.register("echo", "127.0.0.1", port, meta={"meshfed-port-name": "tcp"})
        kube.apply(service("echo", ports={"tcp": 7}))
        kube.apply(endpoint_slice("echo", [("127.0.0.1", True, "")], port, port_name="tcp"))
        east = Zone.init(
            tmp_path / "east", "east", "east.mesh", catalog="consul", consul=ConsulSettings(address=consul.address)
        )
        west = Zone.init(
            tmp_path / "west",
            "west",
            "west.mesh",
            catalog="kubernetes",
            kubernetes=KubernetesSettings(kubeconfig=str(kube.write_kubeconfig(tmp_path / "kubeconfig"))),
        )
        north = Zone.init(tmp_path / "north", "north", "north.mesh")
        with EmbeddedCatalog(north.directory) as catalog:
            catalog.register(
                Service(name="echo", ports={"tcp": 7}, endpoints=[Endpoint(address="127.0.0.1", port=port)])
            )
        zones = {"east": east, "west": west, "north": north}
        for name, zone in zones.items():
            with ExportRules(zone.directory) as rules:
                rules.add("echo", "default", [other for other in zones if other != name])

        async def scenario() -> None:
            runtimes = {name: assemble_zone(zone, LOOPBACK) for name, zone in zones.items()}
            for runtime in runtimes.values():
                await runtime.controller.start()
            try:
                for acceptor, dialer in (("east", "west"), ("east", "north"), ("west", "north")):
                    token = runtimes[acceptor].peering.issue_token(dialer).encoded
                    await runtimes[dialer].peering.establish(token, acceptor)
                for caller, callee in itertools.permutations(zones, 2):
                    runtime = runtimes[caller]
                    listener = f"egress:echo.default.{callee}:tcp"
                    await eventually(
                        functools.partial(_serves, runtime, listener),
                        f"{caller}'s egress for {callee}'s echo",
                        timeout=15,
                    )
                    payload = f"{caller} calls {callee}".encode()
                    assert await call(runtime, listener, payload) == payload

                # The imports are where each zone's own clients look for services.
                def consul_has_imports() -> bool:
                    names = {s["Service"] for s in consul.registered("meshfed-east").values()}
                    return names == {"echo-west", "echo-north"}

                def kubernetes_has_mirrors() -> bool:
                    mirrors = kube.objects("services", "default", f"{MIRROR_LABEL}=true,{OWNER_LABEL}=west")
                    slices = kube.objects("endpointslices", "default", f"{MIRROR_LABEL}=true")
                    return {m["metadata"]["name"] for m in mirrors} == {"echo-east", "echo-north"} and len(slices) == 2

                await eventually(consul_has_imports, "imports registered in Consul")
                await eventually(kubernetes_has_mirrors, "imports mirrored in Kubernetes")
                registered = consul.registered("meshfed-east")["meshfed-echo.default.west"]
                egress_host, egress_port = runtimes["east"].controller.gateway.addresses()[
                    "egress:echo.default.west:tcp"
                ]
                assert (registered["Address"], registered["Port"]) == (egress_host, egress_port)
                # ...and never re-exported as local services.
                for name in ("east", "west"):
                    local = runtimes[name].controller.exported_snapshot("north")
                    assert [s.name for s in local.services] == ["echo"]

                # Deleting a peering takes its imports out of Consul and Kubernetes again.
                await runtimes["north"].peering.delete("west")
                await runtimes["north"].peering.delete("east")
                await eventually(
                    lambda: {s["Service"] for s in consul.registered("meshfed-east").values()} == {"echo-west"},
                    "north's import deregistered from Consul",
                )
                await eventually(
                    lambda: (
                        [m["metadata"]["name"] for m in kube.objects("services", "default", f"{OWNER_LABEL}=west")]
                        == ["echo-east"]
                    ),
                    "north's mirror deleted from Kubernetes",
                    timeout=15,
                )
            finally:
                for runtime in reversed(list(runtimes.values())):
                    await runtime.controller.stop()

        asyncio.run(scenario())
    # Every call reached a backend once (health checks connect too, but send nothing).
    payloads = [f"{caller} calls {callee}".encode() for caller, callee in itertools.permutations(zones, 2)]
    assert len(echo_server.received) == sum(map(len, payloads))
    assert all(payload in echo_server.received for payload in payloads)


# -- the same federation on the real servers --------------------------------------------------------------

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


def meshfed_consul_token(consul: RealConsul, name: str) -> str:
    """A token with exactly the policy the docs tell operators to write."""
    policy = consul_call(
        consul, "PUT", "/v1/acl/policy", {"Name": f"meshfed-{name}", "Rules": CONSUL_POLICY.read_text()}
    )
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
        token_file.write_text(meshfed_consul_token(consul, names["consul"]))
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
        settings["kube"] = replace(LOOPBACK, egress_host=netns.host)

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
