"""A mixed federation: one zone on Consul, one on Kubernetes, one embedded — each assembled as `meshfed up` does.

Each zone exports its own ``echo`` to both others; every zone then calls the
other two through its gateway's egress, and the imports show up where local
clients look: registered in Consul, mirrored as Kubernetes Services.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from pathlib import Path

from meshfed.catalog import ConsulSettings, EmbeddedCatalog, Endpoint, KubernetesSettings, Service
from meshfed.catalog.kubernetes import MIRROR_LABEL, OWNER_LABEL
from meshfed.federation.exports import ExportRules
from meshfed.runtime import ZoneRuntime, assemble_zone
from meshfed.zone import Zone
from tests.conftest import EchoServer, eventually
from tests.doubles.consul import ConsulDouble
from tests.doubles.kubernetes import KubernetesDouble, endpoint_slice, service
from tests.test_e2e_federation import LOOPBACK, call


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
