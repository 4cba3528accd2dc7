"""A zone whose leader dies with its volume: a follower on an empty directory takes over as the same zone.

`meshfed up --leader-lease --state-secret`, against the real kube-apiserver: east's leader peers with west
(a plain `meshfed up` zone) by the CLI, imports west's `web` and exports its own `api`. Then it is killed,
and its directory is never seen again. The follower, started on a directory `zone init` made (another CA,
another admin token), leads, restores the zone from its Secrets, and is east: the same CA and tokens, the
peering with west back without establishing it again, traffic both ways.
"""

from __future__ import annotations

import base64
import contextlib
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from meshfed.replica.files import take_copy
from meshfed.replica.manifest import parse_manifest
from meshfed.replica.stores import REPLICA_LABEL
from meshfed.zone import Zone
from tests.conftest import free_port, running_echo_server, settled
from tests.servers import real_kubernetes
from tests.test_leadership import NAMESPACE, ProcessLog, status_of, up_candidate
from tests.test_up_federation import call, meshfed, meshfed_up


def _east(directory: Path, identity: str, name: str, ports: tuple[int, int], *extra: str) -> subprocess.Popen[bytes]:
    flags = [
        *("--leader-lease", f"{NAMESPACE}/{name}", "--leader-lease-duration", "3s"),
        *("--leader-pod", f"{NAMESPACE}/{name}-{identity}"),  # a pod object (no kubelet runs it) to label
        *("--state-secret", f"{NAMESPACE}/{name}"),
        *("--advertise-host", "127.0.0.1", "--health-check-interval", "1s"),
        *extra,
    ]
    return up_candidate(directory, identity, flags, *ports, {"KUBECONFIG": real_kubernetes().admin_kubeconfig})


def _kubectl(*args: str) -> str:
    kube = real_kubernetes()
    done = subprocess.run(
        [kube.kubectl, "--kubeconfig", kube.admin_kubeconfig, *args], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout


def _leader_label(pod: str) -> str:
    """The pod's meshfed.io/leader label, as the process in it set it ("" before it did)."""
    return _kubectl("get", "pod", pod, "-n", NAMESPACE, "-o", r"jsonpath={.metadata.labels.meshfed\.io/leader}")


def _published(directory: Path, name: str) -> bool:
    """Whether the replica in Secret ``name`` holds the zone directory as it is now."""
    kube = real_kubernetes()
    stored = subprocess.run(
        [
            *(kube.kubectl, "--kubeconfig", kube.admin_kubeconfig, "get", "secret", name, "-n", NAMESPACE),
            *("-o", "jsonpath={.data.manifest}"),
        ],
        capture_output=True,
        check=False,
        timeout=30,
    )
    if stored.returncode != 0 or not stored.stdout:
        return False
    manifest = parse_manifest(base64.b64decode(stored.stdout), name)
    return manifest.files == take_copy(directory).files


def _until(what: str, check: Callable[[], object]) -> None:
    """Wait for what the zones' processes do: each check asks a server, so every 0.1 s."""
    settled(check, bool, what, timeout=30, every=0.1)


def _imported(api: httpx.Client, directory: Path, service: str) -> tuple[str, int] | None:
    """Where local clients reach the imported ``service`` (<name>.<namespace>.<peer>: its egress listener)."""
    reader = {"Authorization": f"Bearer {Zone.open(directory).read_token()}"}
    with contextlib.suppress(httpx.TransportError):
        for imported in api.get("/v1/catalog", headers=reader).json()["imports"]:
            if imported["name"] == service and "tcp" in imported["local_addresses"]:
                host, port = imported["local_addresses"]["tcp"].rsplit(":", 1)
                return host, int(port)
    return None


def test_a_follower_on_an_empty_directory_takes_over_as_the_same_zone_with_its_peering(tmp_path: Path) -> None:
    west_dir, east_a, east_b = tmp_path / "west", tmp_path / "east-a", tmp_path / "east-b"
    meshfed("zone", "init", "--dir", str(west_dir), "--name", "west", "--trust-domain", "west.mesh")
    meshfed("zone", "init", "--dir", str(east_a), "--name", "east", "--trust-domain", "east.mesh")
    name = f"meshfed-test-{uuid.uuid4().hex[:8]}"
    ports_a, ports_b = (free_port(), free_port()), (free_port(), free_port())
    processes: list[subprocess.Popen[bytes]] = []
    for identity in ("east-a", "east-b"):
        _kubectl("run", f"{name}-{identity}", "-n", NAMESPACE, "--image=registry.example/meshfed", "--restart=Never")
    with contextlib.ExitStack() as stack:
        web, api_backend = stack.enter_context(running_echo_server()), stack.enter_context(running_echo_server())
        meshfed(
            *("service", "register", "--dir", str(west_dir), "--name", "web", "--port", "tcp=7"),
            *("--endpoint", web.endpoint),
        )
        meshfed("export", "add", "--dir", str(west_dir), "--service", "web", "--to", "east")
        west = stack.enter_context(meshfed_up(west_dir))
        try:
            first = _east(east_a, "east-a", name, ports_a)
            processes.append(first)
            ProcessLog(first).wait_for("API on")
            east_api = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{ports_a[0]}", timeout=5))
            token = meshfed("peer", "token", "--dir", str(west_dir), "--peer", "east").strip()
            meshfed("peer", "establish", "--dir", str(east_a), "--name", "west", "-", stdin=token)
            _until("east-a's import of web", lambda: _imported(east_api, east_a, "web.default.west") is not None)
            _until("east-a's pod labelled the leader", lambda: _leader_label(f"{name}-east-a") == "true")
            meshfed(
                *("service", "register", "--dir", str(east_a), "--name", "api", "--port", "tcp=7"),
                *("--endpoint", api_backend.endpoint),
            )
            meshfed("export", "add", "--dir", str(east_a), "--service", "api", "--to", "west")
            _until("west's import of east's api", lambda: _imported(west.api, west_dir, "api.default.east") is not None)
            # The peering, the import and the export, in the replica.
            _until("east-a's state published", lambda: _published(east_a, name))

            meshfed("zone", "init", "--dir", str(east_b), "--name", "east", "--trust-domain", "east.mesh")
            assert (east_b / "ca/root.pem").read_bytes() != (east_a / "ca/root.pem").read_bytes()
            # The deployer's read token (a mounted Secret) wins over the one the replica holds.
            deployers = tmp_path / "read-token"
            deployers.write_text("a-read-token-the-deployer-rotated\n")
            second = _east(east_b, "east-b", name, ports_b, "--read-token-file", str(deployers))
            processes.append(second)
            follower = ProcessLog(second)
            follower.wait_for("east-a leads; east-b follows")
            # Ready (so a Deployment of both is Available) and labelled so that no Service selects it.
            assert status_of(ports_b[1], "/readyz") == 200
            assert _leader_label(f"{name}-east-b") == "false"
            first.kill()
            first.wait()
            restored = follower.wait_for("restored generation", seconds=20)
            took = restored + follower.wait_for("API on")
            assert took < 15, took  # the bound; the lease lasts 3 s here
            print(f"east-b led and served {took:.1f} s after east-a was killed")

            # The same zone: its CA, its tokens, its peering (never established again) and its traffic.
            for path in ("ca/root.pem", "ca/intermediate.pem", "admin-token"):
                assert (east_b / path).read_bytes() == (east_a / path).read_bytes(), path
            assert (east_b / "read-token").read_text() == deployers.read_text()
            east_api = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{ports_b[0]}", timeout=5))
            reader = {"Authorization": f"Bearer {Zone.open(east_b).read_token()}"}

            def peering_active() -> bool:
                with contextlib.suppress(httpx.TransportError):
                    peering = east_api.get("/v1/peerings/west", headers=reader).json()
                    return bool(peering["state"] == "ACTIVE" and peering["connected"])
                return False

            _until("east-b's peering with west active", peering_active)
            _until("east-b's pod labelled the leader", lambda: _leader_label(f"{name}-east-b") == "true")
            _until("east-b's import of web", lambda: _imported(east_api, east_b, "web.default.west") is not None)
            web_address = _imported(east_api, east_b, "web.default.west")
            assert web_address is not None
            _until("web through east-b", lambda: call(web_address, b"after takeover") == b"after takeover")
            # West follows east's gateway to its new address.
            _until(
                "east's api through west after the takeover",
                lambda: (
                    (address := _imported(west.api, west_dir, "api.default.east")) is not None
                    and call(address, b"still east") == b"still east"
                ),
            )
            assert api_backend.received.endswith(b"still east")
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        _kubectl("delete", "secrets", "-n", NAMESPACE, "-l", f"{REPLICA_LABEL}={name}")
        _kubectl("delete", "pods", "-n", NAMESPACE, f"{name}-east-a", f"{name}-east-b", "--wait=false")
