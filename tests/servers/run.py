"""Start and stop the real servers the tests run against, on fixed loopback ports.

    python tests/servers/run.py start DIR [consul|kubernetes|spire ...]  # build (once), start, write DIR/servers.json
    python tests/servers/run.py stop DIR                           # stop what DIR/servers.json lists, by PID

What runs:

* **Consul** in ``-dev`` mode with ACLs enabled and ``default_policy = "deny"``
  (the production default); the management token is in ``servers.json``, and
  each test creates the tokens it needs with the policy the docs tell
  operators to write.
* **SPIRE** (``spire-server``): built only; each test runs its own server on a
  fresh datastore (tests rotate its CA), see ``tests/spire.py``.
* **etcd**, **kube-apiserver** and **kube-controller-manager**: a control plane
  without a kubelet. Pods stay Pending, but every object is admitted,
  validated and authorized by the real server (``Node,RBAC``; PodSecurity
  admission is on by default). The controller-manager creates namespaces'
  default ServiceAccounts and EndpointSlices for selector Services.

Ports are fixed and below 32768 (ports in the ephemeral range collide with the
local ends of client connections); ``MESHFED_TEST_PORT_BASE`` moves them all,
so two runs can share a machine. Binaries come from ``tests/servers/build``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent
PORT_BASE = int(os.environ.get("MESHFED_TEST_PORT_BASE", "23400"))
READY_TIMEOUT = 120.0
STATE_FILE = "servers.json"
# The Service range the API server allocates ClusterIPs from; never routed here.
SERVICE_RANGE = "10.96.0.0/16"


def ports() -> dict[str, int]:
    """Every port the servers bind, from one base."""
    names = [
        "consul_http",
        "consul_grpc",
        "consul_serf_lan",
        "consul_serf_wan",
        "consul_server",
        "consul_dns",
        "etcd_client",
        "etcd_peer",
        "kube_apiserver",
        "kube_controller_manager",
    ]
    return {name: PORT_BASE + offset for offset, name in enumerate(names)}


def build(*names: str) -> dict[str, Path]:
    out = subprocess.run([str(HERE / "build"), *names], check=True, stdout=subprocess.PIPE, text=True).stdout
    return {name: Path(line) / "bin" for name, line in zip(names, out.split(), strict=True)}


# -- processes ------------------------------------------------------------------------------------------


def spawn(state: Path, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    with (state / f"{name}.log").open("ab") as log:
        # A process group of its own, so stop() ends it and anything it started.
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )


def wait_for(what: str, check: Callable[[], bool], process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"{what} exited with {process.returncode} while starting; the end of {log}:\n{tail}")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} was not ready after {READY_TIMEOUT:.0f} s; see {log}")


def http_ok(url: str, *, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None) -> bool:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=2, context=context) as response:
        return bool(200 <= response.status < 300)


# -- certificates for the Kubernetes control plane -----------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _certificate(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=30))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def make_pki(pki: Path) -> None:
    """A CA, the API server's serving certificate, client certificates, and the service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshfed-test-kubernetes-ca")])
    ca_usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
    ca = _certificate(
        ca_name, ca_key, ca_name, ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True), (ca_usage, True)]
    )
    (pki / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(pki / "ca.key", ca_key)

    def leaf(name: str, common_name: str, *, groups: tuple[str, ...] = (), server: bool = False) -> None:
        key = _key()
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        subject += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, group) for group in groups]
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        extensions: list[tuple[x509.ExtensionType, bool]] = [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([usage]), False),
        ]
        if server:
            names: list[x509.GeneralName] = [
                x509.DNSName(dns) for dns in ("localhost", "kubernetes", "kubernetes.default.svc")
            ]
            names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "10.96.0.1")]
            extensions.append((x509.SubjectAlternativeName(names), False))
        cert = _certificate(x509.Name(subject), key, ca_name, ca_key, extensions)
        (pki / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(pki / f"{name}.key", key)

    leaf("apiserver", "kube-apiserver", server=True)
    leaf("admin", "meshfed-test-admin", groups=("system:masters",))
    leaf("controller-manager", "system:kube-controller-manager")
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki / "sa.key", sa)
    (pki / "sa.pub").write_bytes(
        sa.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def kubeconfig(path: Path, server: str, ca: Path, user: dict[str, str]) -> None:
    """A kubeconfig for one user (client certificate or token) of the test API server."""
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "meshfed-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "meshfed-test", "context": {"cluster": "meshfed-test", "user": "user"}}],
        "current-context": "meshfed-test",
    }
    path.write_text(json.dumps(document, indent=2))
    path.chmod(0o600)


# -- the servers ----------------------------------------------------------------------------------------


def start_consul(state: Path, binary: Path, port: dict[str, int]) -> dict[str, Any]:
    token = str(uuid.uuid4())
    config = {
        "ports": {
            "http": port["consul_http"],
            "grpc": port["consul_grpc"],
            "grpc_tls": -1,
            "serf_lan": port["consul_serf_lan"],
            "serf_wan": port["consul_serf_wan"],
            "server": port["consul_server"],
            "dns": port["consul_dns"],
        },
        "acl": {
            "enabled": True,
            "default_policy": "deny",
            "enable_token_persistence": False,
            # The agent's own token too: without it the dev agent logs a denied node update every few seconds.
            "tokens": {"initial_management": token, "agent": token},
        },
    }
    (state / "consul.json").write_text(json.dumps(config))
    argv = [
        str(binary / "consul"),
        "agent",
        "-dev",
        "-client",
        "127.0.0.1",
        "-bind",
        "127.0.0.1",
        "-node",
        "meshfed-test",
        "-config-file",
        str(state / "consul.json"),
    ]
    consul = spawn(state, "consul", argv)
    address = f"http://127.0.0.1:{port['consul_http']}"
    headers = {"X-Consul-Token": token}

    def ready() -> bool:
        with urllib.request.urlopen(
            urllib.request.Request(f"{address}/v1/status/leader", headers=headers), timeout=2
        ) as r:
            leader = json.loads(r.read())
        return bool(leader) and http_ok(f"{address}/v1/catalog/nodes", headers=headers)

    wait_for("Consul", ready, consul, state / "consul.log")
    return {"pid": consul.pid, "address": address, "management_token": token, "version": "1.14.11"}


def start_kubernetes(state: Path, bins: dict[str, Path], port: dict[str, int]) -> dict[str, Any]:
    pki = state / "pki"
    make_pki(pki)
    etcd_client = f"http://127.0.0.1:{port['etcd_client']}"
    etcd_peer = f"http://127.0.0.1:{port['etcd_peer']}"
    etcd = spawn(
        state,
        "etcd",
        [
            str(bins["etcd"] / "etcd"),
            "--name=meshfed-test",
            f"--data-dir={state / 'etcd'}",
            f"--listen-client-urls={etcd_client}",
            f"--advertise-client-urls={etcd_client}",
            f"--listen-peer-urls={etcd_peer}",
            f"--initial-advertise-peer-urls={etcd_peer}",
            f"--initial-cluster=meshfed-test={etcd_peer}",
            # Test data: durability is not worth the fsyncs.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
    )
    wait_for("etcd", lambda: http_ok(f"{etcd_client}/health"), etcd, state / "etcd.log")

    admin_token = uuid.uuid4().hex
    (pki / "tokens.csv").write_text(f'{admin_token},meshfed-test-token-admin,uid-admin,"system:masters"\n')
    server = f"https://127.0.0.1:{port['kube_apiserver']}"
    kube = bins["kubernetes"]
    apiserver = spawn(
        state,
        "kube-apiserver",
        [
            str(kube / "kube-apiserver"),
            f"--etcd-servers={etcd_client}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port['kube_apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--authorization-mode=Node,RBAC",
            # No kubelet registers this address as the `kubernetes` Service's endpoint.
            "--endpoint-reconciler-type=none",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
            "--storage-media-type=application/json",
        ],
    )
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    auth = {"Authorization": f"Bearer {admin_token}"}
    wait_for(
        "kube-apiserver",
        lambda: http_ok(f"{server}/readyz", headers=auth, context=context),
        apiserver,
        state / "kube-apiserver.log",
    )

    admin_config = state / "admin.kubeconfig"
    kubeconfig(
        admin_config,
        server,
        pki / "ca.crt",
        {"client-certificate": str(pki / "admin.crt"), "client-key": str(pki / "admin.key")},
    )
    manager_config = state / "controller-manager.kubeconfig"
    kubeconfig(
        manager_config,
        server,
        pki / "ca.crt",
        {"client-certificate": str(pki / "controller-manager.crt"), "client-key": str(pki / "controller-manager.key")},
    )
    manager = spawn(
        state,
        "kube-controller-manager",
        [
            str(kube / "kube-controller-manager"),
            f"--kubeconfig={manager_config}",
            f"--authentication-kubeconfig={manager_config}",
            f"--authorization-kubeconfig={manager_config}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port['kube_controller_manager']}",
            "--use-service-account-credentials",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            # No nodes here: nothing to allocate pod ranges for or to watch for readiness.
            "--controllers=*,-node-ipam-controller,-node-lifecycle-controller",
            "--leader-elect=false",
        ],
    )

    def default_account() -> bool:
        # The controllers are running once the default namespace has its ServiceAccount.
        return http_ok(f"{server}/api/v1/namespaces/default/serviceaccounts/default", headers=auth, context=context)

    wait_for("kube-controller-manager", default_account, manager, state / "kube-controller-manager.log")
    return {
        "pids": [manager.pid, apiserver.pid, etcd.pid],
        "server": server,
        "ca_file": str(pki / "ca.crt"),
        "admin_kubeconfig": str(admin_config),
        "admin_token": admin_token,
        "kubectl": str(kube / "kubectl"),
        "version": "1.37.2",
    }


SERVERS = ("consul", "kubernetes", "spire")
SPIRE_VERSION = "1.13.3"


def start(state: Path, which: tuple[str, ...] = SERVERS) -> None:
    state.mkdir(parents=True, exist_ok=True)
    if (state / STATE_FILE).exists():
        stop(state)
    wanted = (
        ["helm"]
        + (["consul"] if "consul" in which else [])
        + (["etcd", "kubernetes"] if "kubernetes" in which else [])
        + (["spire"] if "spire" in which else [])
    )
    bins = build(*wanted)
    port = ports()
    document: dict[str, Any] = {"ports": port, "helm": str(bins["helm"] / "helm")}
    if "spire" in which:
        document["spire"] = {"spire_server": str(bins["spire"] / "spire-server"), "version": SPIRE_VERSION}
    # Written as each server comes up, so a failed start still stops what did start.
    try:
        if "consul" in which:
            document["consul"] = start_consul(state, bins["consul"], port)
            (state / STATE_FILE).write_text(json.dumps(document, indent=2))
        if "kubernetes" in which:
            document["kubernetes"] = start_kubernetes(state, bins, port)
    finally:
        (state / STATE_FILE).write_text(json.dumps(document, indent=2))
    ready = [f"Consul {document['consul']['address']}" if "consul" in document else ""]
    ready.append(f"kube-apiserver {document['kubernetes']['server']}" if "kubernetes" in document else "")
    print(f"real servers ready ({state}): {', '.join(filter(None, ready))}")


def stop(state: Path) -> None:
    path = state / STATE_FILE
    if not path.exists():
        return
    document = json.loads(path.read_text())
    pids = [document.get("consul", {}).get("pid"), *document.get("kubernetes", {}).get("pids", [])]
    for pid in filter(None, pids):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 15
    for pid in filter(None, pids):
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    path.unlink()
    # etcd's data is test data: the next start begins empty.
    subprocess.run(["rm", "-rf", str(state / "etcd")], check=False)


def main() -> None:
    which = tuple(sys.argv[3:]) or SERVERS
    if len(sys.argv) < 3 or sys.argv[1] not in ("start", "stop") or not set(which) <= set(SERVERS):
        raise SystemExit("usage: run.py start DIR [consul] [kubernetes] [spire] | run.py stop DIR")
    state = Path(sys.argv[2]).resolve()
    if sys.argv[1] == "start":
        start(state, which)
    else:
        stop(state)


if __name__ == "__main__":
    main()
