"""Real pods: two zones installed with the chart on a one-node cluster, peered, carrying a request.

tests/servers/node.py starts the node (etcd, API server, controller-manager,
scheduler, containerd, kubelet, kube-proxy) in a private network and mount
namespace; tests/servers/node/images.py builds the meshfed image of the
working tree without a registry. Then, as a user following the chart's NOTES:

* ``helm install`` zones east and west (highAvailability: two pods each, the
  state in Secrets), each in its own namespace; there is no cluster DNS, so
  each zone is upgraded to advertise its Services' cluster IPs;
* in the leaders' pods (label ``meshfed.io/leader=true``), ``meshfed peer
  token`` in east and ``meshfed peer establish`` in west;
* east registers an echo pod and exports it to west; a client pod in west
  sends a line to west's import listener and gets the echo back through both
  gateways;
* both zones run their gateway apart (``gateway.deployment.enabled``): east's
  upgrade to a new image tag rolls its gateway pods and its controllers while
  west calls east's echo in a loop through them, and not one call fails;
* west's leader is killed (SIGKILL) with its pod: a follower leads within 15 s
  with the import intact, and the request goes through again;
* a gateway pod of east is deleted while west calls in a loop: none fails;
* every pod of west is deleted at once: the zone comes back with its CA and
  its peering, and carries the call again.

Cost on 2 cores with warm caches: about a minute and a half (node Ready in
~12 s, image ~6 s, import ~10 s). Cold: the node binaries (~3 CPU-minutes,
more if the API server must be rebuilt too), debootstrap (~3 min) and the
dependency layer (~1 min), once per machine.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import settled
from tests.servers.node import ROOT, Node, images

CHART = ROOT / "helm" / "meshfed"
ZONE_DIR = "/var/lib/meshfed/zone"
ZONES = ("east", "west")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    directory = tmp_path_factory.mktemp("node")
    with Node(directory / "node") as running:
        yield running
    assert running.leftovers() == [], "the node left processes or cgroups behind"
    # The unpacked images and etcd's data are big; the logs stay for a post-mortem.
    for big in ("containerd", "etcd"):
        shutil.rmtree(directory / "node" / big, ignore_errors=True)


def leader(node: Node, zone: str, *, not_: str = "", timeout: float = 30.0) -> str:
    """The pod (pod/<name>) of the zone labelled leader, other than ``not_``, Running."""

    def leaders() -> list[str]:
        names = node.kubectl(
            *("-n", zone, "get", "pod", "-o", "name", "--field-selector=status.phase=Running"),
            *("-l", f"meshfed.io/leader=true,app.kubernetes.io/instance={zone}"),
        ).split()
        return [name for name in names if name != not_]

    (name,) = settled(leaders, lambda names: len(names) == 1, f"one leader in zone {zone}", timeout, every=0.25)
    return name


def meshfed(node: Node, zone: str, pod: str, *args: str) -> str:
    return node.kubectl("-n", zone, "exec", "-c", "controller", pod, "--", "meshfed", *args)


def meshfed_file(node: Node, zone: str, pod: str, path: str) -> str:
    """A file of the zone directory in ``pod``."""
    return node.kubectl("-n", zone, "exec", "-c", "controller", pod, "--", "cat", f"{ZONE_DIR}/{path}")


def status(node: Node, zone: str, pod: str) -> dict[str, object]:
    document: dict[str, object] = json.loads(meshfed(node, zone, pod, "status", "--dir", ZONE_DIR, "-o", "json"))
    return document


def cluster_ip(node: Node, zone: str, service: str) -> str:
    return node.kubectl("-n", zone, "get", "svc", f"{zone}-meshfed-{service}", "-o", "jsonpath={.spec.clusterIP}")


def echo_pods(image: str) -> str:
    """An echo server in east (the meshfed image's python3) and an idle client in west."""
    server = (
        "import socketserver\n"
        "class Echo(socketserver.StreamRequestHandler):\n"
        "    def handle(self):\n"
        "        self.wfile.write(b'echo:' + self.rfile.readline())\n"
        "socketserver.ThreadingTCPServer.allow_reuse_address = True\n"
        "socketserver.ThreadingTCPServer(('0.0.0.0', 8080), Echo).serve_forever()\n"
    )

    def pod(name: str, namespace: str, command: list[str], probe: bool) -> dict[str, object]:
        container: dict[str, object] = {
            "name": name,
            "image": image,
            "imagePullPolicy": "Never",
            "command": command,
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }
        if probe:
            container["readinessProbe"] = {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
            "spec": {
                "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                "terminationGracePeriodSeconds": 1,
                "containers": [container],
            },
        }

    items = [
        pod("echo", "east", ["python3", "-c", server], probe=True),
        pod("client", "west", ["python3", "-c", "import signal; signal.pause()"], probe=False),
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def call(node: Node, address: str, line: str) -> str:
    """One line sent from the client pod in west to ``address``; the answer."""
    host, port = address.rsplit(":", 1)
    script = (
        "import socket, sys\n"
        f"s = socket.create_connection(({host!r}, {int(port)}), timeout=10)\n"
        f"s.sendall({(line + chr(10)).encode()!r})\n"
        "sys.stdout.write(s.makefile('rb').readline().decode())\n"
    )
    return node.kubectl("-n", "west", "exec", "client", "--", "python3", "-c", script)


def calls_for(node: Node, address: str, seconds: float) -> dict[str, object]:
    """From the client pod in west: a new connection and one line to ``address`` after another for ``seconds``
    (each bounded by a 5 s timeout); how many came back echoed, how many did not, and the first few errors."""
    host, port = address.rsplit(":", 1)
    script = (
        "import json, socket, time\n"
        f"deadline, ok, failed, errors = time.monotonic() + {seconds}, 0, 0, []\n"
        "while time.monotonic() < deadline:\n"
        "    try:\n"
        f"        with socket.create_connection(({host!r}, {int(port)}), timeout=5) as s:\n"
        "            s.sendall(b'loop\\n')\n"
        "            answer = s.makefile('rb').readline()\n"
        "        if answer == b'echo:loop\\n':\n"
        "            ok += 1\n"
        "            continue\n"
        "        failed += 1\n"
        "        errors.append(repr(answer)[:100])\n"
        "    except OSError as err:\n"
        "        failed += 1\n"
        "        errors.append(repr(err)[:100])\n"
        "print(json.dumps({'ok': ok, 'failed': failed, 'errors': errors[:5]}))\n"
    )
    out = node.kubectl("-n", "west", "exec", "client", "--", "python3", "-c", script, timeout=seconds + 60)
    result: dict[str, object] = json.loads(out)
    return result


def import_address(node: Node, pod: str, timeout: float = 30.0) -> str:
    """Where west's clients reach east's echo, once west's leader ``pod`` serves it with a healthy endpoint."""

    def served() -> str:
        imports = status(node, "west", pod)["imports"]
        assert isinstance(imports, list)
        for entry in imports:
            if entry["name"] == "echo.default.east" and entry["healthy_endpoints"] >= 1:
                return str(entry["local_addresses"]["tcp"])
        return ""

    return settled(served, bool, "west's import of echo.default.east", timeout, every=0.5)


# Cold caches (binaries, rootfs, dependency layer) take longer than the warm ~2 minutes.
@pytest.mark.timeout(1200)
def test_two_zones_in_pods_carry_a_request_and_survive_the_leader(node: Node, tmp_path: Path) -> None:
    started = time.monotonic()
    ref, archive = images.meshfed_image(tmp_path / "image")
    node.load_image(archive)
    shutil.rmtree(tmp_path / "image")  # hundreds of MB, now in containerd
    repository, tag = ref.rsplit(":", 1)
    image_ready = time.monotonic() - started

    for zone in ZONES:
        node.kubectl("create", "namespace", zone)
        node.helm(
            "install",
            zone,
            str(CHART),
            "-n",
            zone,
            "--set",
            f"image.repository={repository}",
            "--set",
            f"image.tag={tag}",
            "--set",
            "image.pullPolicy=Never",
            "--set",
            "highAvailability.enabled=true",
            "--set",
            "gateway.service.type=ClusterIP",
            "--set",
            "peering.service.type=ClusterIP",
            "--set",
            f"zone.name={zone}",
            "--set",
            f"zone.trustDomain={zone}.mesh",
            # The gateway apart: `meshfed gateway` pods behind the gateway Service, fed by the leader.
            "--set",
            "gateway.deployment.enabled=true",
        )
    # No cluster DNS here: advertise the Services' cluster IPs instead of their DNS names (NOTES, step 2).
    for zone in ZONES:
        gateway, peering = cluster_ip(node, zone, "gateway"), cluster_ip(node, zone, "peering")
        node.helm(
            "upgrade",
            zone,
            str(CHART),
            "-n",
            zone,
            "--reuse-values",
            "--set",
            f"gateway.advertise={{{gateway}:15443}}",
            "--set",
            f"peering.advertiseHost={peering}",
        )
    manifest = tmp_path / "pods.json"
    manifest.write_text(echo_pods(ref))
    node.kubectl("apply", "-f", str(manifest))
    for zone in ZONES:
        for deployment in (f"{zone}-meshfed", f"{zone}-meshfed-gateway"):
            node.kubectl("-n", zone, "rollout", "status", f"deploy/{deployment}", "--timeout=180s", timeout=200)
    node.kubectl("-n", "east", "wait", "--for=condition=Ready", "pod/echo", "--timeout=60s", timeout=70)
    node.kubectl("-n", "west", "wait", "--for=condition=Ready", "pod/client", "--timeout=60s", timeout=70)
    zones_ready = time.monotonic() - started

    east, west = leader(node, "east"), leader(node, "west")
    token = meshfed(node, "east", east, "peer", "token", "--dir", ZONE_DIR, "--peer", "west", "--ttl", "15m").strip()
    meshfed(node, "west", west, "peer", "establish", "--dir", ZONE_DIR, token)

    echo_ip = node.kubectl("-n", "east", "get", "pod", "echo", "-o", "jsonpath={.status.podIP}")
    socket.inet_aton(echo_ip)
    meshfed(
        node,
        "east",
        east,
        "service",
        "register",
        "--dir",
        ZONE_DIR,
        "--name",
        "echo",
        "--port",
        "tcp=8080",
        "--endpoint",
        f"{echo_ip}:8080",
    )
    meshfed(node, "east", east, "export", "add", "--dir", ZONE_DIR, "--service", "echo", "--to", "west")

    address = import_address(node, west)
    assert address.split(":")[0] != "127.0.0.1"
    assert call(node, address, "across zones") == "echo:across zones\n"
    first_call = time.monotonic() - started

    # An upgrade of east to a new image tag rolls its gateway pods (and its controllers, one leader handing
    # over) while west calls east's echo in a loop through them: not one call fails.
    node.ctr("images", "tag", ref, f"{repository}:{tag}-next")
    loop: list[dict[str, object]] = []
    caller = threading.Thread(target=lambda: loop.append(calls_for(node, address, 60.0)))
    caller.start()
    rolled = time.monotonic()
    node.helm("upgrade", "east", str(CHART), "-n", "east", "--reuse-values", "--set", f"image.tag={tag}-next")
    for deployment in ("east-meshfed-gateway", "east-meshfed"):
        node.kubectl("-n", "east", "rollout", "status", f"deploy/{deployment}", "--timeout=55s", timeout=60)
    roll = time.monotonic() - rolled
    caller.join(timeout=120)
    (counts,) = loop
    assert counts["failed"] == 0, f"calls failed during east's rolling upgrade: {counts}"
    assert isinstance(counts["ok"], int)
    assert counts["ok"] > 0

    # The leader crashes (SIGKILL: no handover, the Lease left to expire) and its pod is gone; a follower takes
    # the Lease and the zone's state from its Secrets.
    killed = time.monotonic()
    pod_name = west.removeprefix("pod/")
    node.run_in_netns("pkill", "-KILL", "-f", f"leader-identity={pod_name}( |$)")
    node.kubectl("-n", "west", "delete", west, "--grace-period=0", "--force", "--wait=false")
    new_west = leader(node, "west", not_=west, timeout=15.0)
    took = time.monotonic() - killed
    assert took <= 15.0, f"no new leader in 15 s ({took:.1f}s)"
    peerings = status(node, "west", new_west)["peerings"]
    assert isinstance(peerings, list)
    assert [p["name"] for p in peerings] == ["east"]
    address = import_address(node, new_west)
    assert call(node, address, "after failover") == "echo:after failover\n"

    # A gateway pod of east deleted (as a node drain does) while west calls through east's gateways: none fails.
    loop.clear()
    caller = threading.Thread(target=lambda: loop.append(calls_for(node, address, 25.0)))
    caller.start()
    selector = "app.kubernetes.io/instance=east,app.kubernetes.io/component=gateway"
    gateways = node.kubectl("-n", "east", "get", "pod", "-o", "name", "-l", selector).split()
    node.kubectl("-n", "east", "delete", gateways[0], "--wait=true", timeout=60)
    caller.join(timeout=90)
    (after_delete,) = loop
    assert after_delete["failed"] == 0, f"calls failed while a gateway pod of east was deleted: {after_delete}"

    # Every pod of west at once (no volume: the zone's state is in Secrets): the same zone comes back, with
    # its CA and its peering, and carries the call again.
    root = meshfed_file(node, "west", new_west, "ca/root.pem")
    node.kubectl("-n", "west", "delete", "pod", "-l", "app.kubernetes.io/instance=west", "--wait=false")
    reborn = leader(node, "west", not_=new_west, timeout=90.0)
    assert meshfed_file(node, "west", reborn, "ca/root.pem") == root
    peerings = status(node, "west", reborn)["peerings"]
    assert isinstance(peerings, list)
    assert [p["name"] for p in peerings] == ["east"]
    address = import_address(node, reborn, timeout=60.0)
    assert call(node, address, "after every pod") == "echo:after every pod\n"

    print(
        f"\npods: node ready {node.timings['node_ready']:.1f}s, image {image_ready:.1f}s, "
        f"zones ready {zones_ready:.1f}s, first call {first_call:.1f}s, rolling upgrade {roll:.1f}s with "
        f"{counts['ok']} calls and {counts['failed']} failed, new leader {took:.1f}s, gateway pod deleted with "
        f"{after_delete['ok']} calls and {after_delete['failed']} failed, "
        f"total {time.monotonic() - started:.1f}s"
    )
