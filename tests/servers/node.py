"""A one-node Kubernetes cluster with real pods, confined in a private network and mount namespace.

``Node(directory)`` starts etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, containerd (runc), kubelet and kube-proxy, all inside one
network + mount namespace held by an ``unshare ... sleep infinity`` process:

* network: only ``lo`` (with the node IP, 10.250.0.1/32) and the pods' CNI
  bridge (``bridge`` + ``host-local`` from Debian's containernetworking-plugins);
  nothing routes out, so no traffic leaves loopback or the namespace.
  Services go through kube-proxy in iptables mode (masquerading every Service
  connection, so a pod can reach a Service whose endpoint sits on the same
  bridge), with a route to the Service range on the bridge for the node itself.
* mounts: ``/run`` is a tmpfs and ``/var`` an overlay whose writes land in the
  directory, so containerd's shims, runc's state, the CNI cache and the pod logs
  never touch the host. The kubelet sets a few machine-wide sysctls at start
  (vm.overcommit_memory, kernel.panic, ...): files holding the values it wants
  are bind-mounted over those /proc/sys entries first, so it reads them, is
  content, and the host's values never change.

All state (etcd, containerd's root and state, the kubelet's) is under the
directory. Images come from OCI archives (``load_image``), never a registry:
the sandbox image is built from node/pause.c. Binaries come from
tests/servers/build (cached per user); the apt packages (containerd, runc,
CNI plugins, iptables, debootstrap) are installed once if missing.

``stop()`` kills every process started here (pods included: their cgroups are
emptied), removes the kubelet's cgroups and the namespace holder, and leaves no
mount behind (they all lived in the private mount namespace).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import IO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import settled

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _load_images() -> ModuleType:
    """tests/servers/node/images.py (the image builders), loaded by path: node/ is no package."""
    spec = importlib.util.spec_from_file_location("meshfed_test_node_images", HERE / "node" / "images.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


images = _load_images()

NODE_NAME = "meshfed-node"
NODE_IP = "10.250.0.1"
POD_RANGE = "10.250.64.0/24"
POD_GATEWAY = "10.250.64.1"
SERVICE_RANGE = "10.250.128.0/20"
SERVICE_API_IP = "10.250.128.1"
# What the node and the image builds call (gcc + libc6-dev: the static pause binary).
APT_PACKAGES = (
    "containerd",
    "runc",
    "containernetworking-plugins",
    "iptables",
    "iproute2",
    "curl",
    "debootstrap",
    "gcc",
    "libc6-dev",
)
# What the kubelet wants these machine-wide sysctls to be (it writes them unless they already are).
KUBELET_SYSCTLS = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}


class NodeError(RuntimeError):
    pass


def ensure_apt_packages(packages: tuple[str, ...] = APT_PACKAGES) -> None:
    """Installs the missing ones, non-interactively (idempotent: nothing to do the second time)."""
    missing = []
    for package in packages:
        status = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
        ).stdout
        if "install ok installed" not in status:
            missing.append(package)
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise NodeError(f"apt-get install {' '.join(missing)} failed: {proc.stderr.strip()[-300:]}")


def build(*names: str) -> dict[str, Path]:
    proc = subprocess.run([str(HERE / "build"), *names], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NodeError(f"tests/servers/build {' '.join(names)} failed: {proc.stderr.strip()[-300:]}")
    return {name: Path(line) / "bin" for name, line in zip(names, proc.stdout.split(), strict=True)}


# -- certificates ---------------------------------------------------------------------------------


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def make_pki(pki: Path) -> None:
    """A CA, the API server's serving certificate, one client certificate per component, the SA keys."""
    pki.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshfed-test-node-ca")])

    def sign(subject: x509.Name, key: ec.EllipticCurvePrivateKey, extensions: list[x509.ExtensionType]) -> bytes:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=7))
        )
        for extension in extensions:
            builder = builder.add_extension(extension, critical=isinstance(extension, x509.BasicConstraints))
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
    (pki / "ca.crt").write_bytes(sign(ca_name, ca_key, [x509.BasicConstraints(ca=True, path_length=None), ca_usage]))
    _write_key(pki / "ca.key", ca_key)

    def leaf(name: str, common_name: str, groups: tuple[str, ...] = (), server: bool = False) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        subject += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, group) for group in groups]
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        extensions: list[x509.ExtensionType] = [
            x509.BasicConstraints(ca=False, path_length=None),
            x509.ExtendedKeyUsage([usage]),
        ]
        if server:
            names: list[x509.GeneralName] = [
                x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
            ]
            names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", NODE_IP, SERVICE_API_IP)]
            extensions.append(x509.SubjectAlternativeName(names))
        (pki / f"{name}.crt").write_bytes(sign(x509.Name(subject), key, extensions))
        _write_key(pki / f"{name}.key", key)

    leaf("apiserver", "kube-apiserver", server=True)
    leaf("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",))
    leaf("admin", "meshfed-test-admin", ("system:masters",))
    leaf("controller-manager", "system:kube-controller-manager")
    leaf("scheduler", "system:kube-scheduler")
    leaf("kube-proxy", "system:kube-proxy")
    leaf("kubelet", f"system:node:{NODE_NAME}", ("system:nodes",))
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki / "sa.key", sa)
    (pki / "sa.pub").write_bytes(
        sa.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _kubeconfig(path: Path, pki: Path, user: str) -> Path:
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "node",
                "cluster": {"server": f"https://{NODE_IP}:6443", "certificate-authority": str(pki / "ca.crt")},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate": str(pki / f"{user}.crt"), "client-key": str(pki / f"{user}.key")},
            }
        ],
        "contexts": [{"name": "node", "context": {"cluster": "node", "user": user}}],
        "current-context": "node",
    }
    path.write_text(json.dumps(document, indent=2))
    path.chmod(0o600)
    return path


# -- the node -------------------------------------------------------------------------------------


class Node:
    """One node, started in ``directory`` (which it owns); a context manager (``with Node(d) as node``)."""

    def __init__(self, directory: Path, *, ready_timeout: float = 120.0) -> None:
        self.dir = Path(directory)
        self.ready_timeout = ready_timeout
        self.holder: subprocess.Popen[bytes] | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self.timings: dict[str, float] = {}
        self.cgroup = ""  # the kubelet's cgroupRoot, named after the namespace holder

    # -- public ---------------------------------------------------------------------------------

    def __enter__(self) -> Node:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_in_netns(
        self, *cmd: str, check: bool = True, timeout: float = 120.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``cmd`` in the node's network and mount namespace; output captured as text."""
        proc = subprocess.run(
            self._ns(*cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**self._env(), **(env or {})},
        )
        if check and proc.returncode != 0:
            out = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
            raise NodeError(f"{Path(cmd[0]).name} {' '.join(cmd[1:4])} ... exited {proc.returncode}: {out}")
        return proc

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120.0) -> str:
        return self.run_in_netns(str(self.bins["kubernetes"] / "kubectl"), *args, check=check, timeout=timeout).stdout

    def helm(self, *args: str, timeout: float = 300.0) -> str:
        return self.run_in_netns(str(self.bins["helm"] / "helm"), *args, timeout=timeout).stdout

    def ctr(self, *args: str, timeout: float = 300.0) -> str:
        sock = self.dir / "containerd/containerd.sock"
        return self.run_in_netns("ctr", f"--address={sock}", "--namespace=k8s.io", *args, timeout=timeout).stdout

    def load_image(self, archive: Path) -> None:
        """Imports an OCI (or docker) image archive into the node's containerd, for imagePullPolicy Never."""
        self.ctr("images", "import", "--no-unpack=false", str(archive))

    # -- start ----------------------------------------------------------------------------------

    def start(self) -> None:
        t0 = time.monotonic()
        ensure_apt_packages()
        self.bins = build("etcd", "kubernetes", "node", "helm")
        self.timings["binaries"] = time.monotonic() - t0
        if self.dir.exists():
            shutil.rmtree(self.dir)
        for sub in ("logs", "pki", "etcd", "containerd", "kubelet", "cni/net.d", "cni/ipam", "ns", "helm"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        make_pki(self.dir / "pki")
        pause_ref, pause_archive = images.pause_image(self.dir / "images")
        self._namespace()
        assert self.holder is not None
        self.cgroup = f"meshfed-test-node-{self.holder.pid}"
        self._make_cgroup_root()
        self._write_configs(pause_ref)
        t1 = time.monotonic()
        self._start_control_plane()
        self._start_containerd()
        self.load_image(pause_archive)
        self._start_kubelet_and_proxy()
        self._wait_ready()
        self.timings["node_ready"] = time.monotonic() - t1

    def _ns(self, *cmd: str) -> list[str]:
        assert self.holder is not None
        return ["nsenter", "-t", str(self.holder.pid), "-n", "-m", "--", *cmd]

    def _env(self) -> dict[str, str]:
        home = self.dir / "helm"
        return {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(home),
            "KUBECONFIG": str(self.dir / "admin.kubeconfig"),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def _namespace(self) -> None:
        """The holder process and, inside its namespaces, lo with the node IP, the bridge, the mounts."""
        self.holder = subprocess.Popen(
            # It says so once the namespaces exist, then becomes the holder (exec keeps its pid).
            ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", "echo ready; exec sleep infinity"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.holder.stdout is not None
        said = self.holder.stdout.readline()  # waits for that line, or for its end if unshare failed
        self.holder.stdout.close()
        if said != b"ready\n":
            raise NodeError("unshare --net --mount failed (no namespace holder)")
        ns = self.dir / "ns"
        lines = [
            "set -e",
            "ip link set lo up",
            f"ip addr add {NODE_IP}/32 dev lo",
            # Pods' bridge made here, so the Service range can be routed to it before any pod.
            "ip link add cni0 type bridge",
            f"ip addr add {POD_GATEWAY}/24 dev cni0",
            "ip link set cni0 up",
            f"ip route add {SERVICE_RANGE} dev cni0",
            "sysctl -qw net.ipv4.ip_forward=1",
            # Writes under /run and /var stay in the namespace / the directory.
            "mount -t tmpfs -o mode=0755 tmpfs /run",
            f"mkdir -p {ns}/var.upper {ns}/var.work",
            f"mount -t overlay overlay -o lowerdir=/var,upperdir={ns}/var.upper,workdir={ns}/var.work /var",
        ]
        for entry, value in KUBELET_SYSCTLS.items():
            held = ns / ("sysctl-" + entry.replace("/", "."))
            held.write_text(value + "\n")
            lines.append(f"mount --bind {held} /proc/sys/{entry}")
        proc = subprocess.run(self._ns("sh", "-c", "; ".join(lines)), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise NodeError(f"namespace setup failed: {proc.stderr.strip()}")

    def _write_configs(self, pause_ref: str) -> None:
        d, pki = self.dir, self.dir / "pki"
        for user in ("admin", "controller-manager", "scheduler", "kube-proxy", "kubelet"):
            _kubeconfig(d / f"{user}.kubeconfig", pki, user)
        c = d / "containerd"
        (c / "config.toml").write_text(
            f"""version = 2
root = "{c}/root"
state = "{c}/state"
[grpc]
  address = "{c}/containerd.sock"
[ttrpc]
  address = "{c}/containerd.sock.ttrpc"
[debug]
  address = "{c}/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{c}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_ref}"
  # No CAP_SYS_RESOURCE here: containers may not get a lower oom_score_adj than containerd.
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni/net.d"
"""
        )
        (d / "cni/net.d/10-meshfed-test.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "0.4.0",
                    "name": "meshfed-test",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": "cni0",
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "dataDir": str(d / "cni/ipam"),
                                "ranges": [[{"subnet": POD_RANGE, "gateway": POD_GATEWAY}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                            },
                        }
                    ],
                },
                indent=2,
            )
        )
        (d / "kubelet/config.json").write_text(
            json.dumps(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    # cgroup v1 (hybrid) on these machines, managed without systemd.
                    "failCgroupV1": False,
                    "cgroupDriver": "cgroupfs",
                    "cgroupRoot": f"/{self.cgroup}",
                    "containerRuntimeEndpoint": f"unix://{d}/containerd/containerd.sock",
                    "address": NODE_IP,
                    "readOnlyPort": 0,
                    "healthzBindAddress": "127.0.0.1",
                    "healthzPort": 10248,
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": False},
                        "x509": {"clientCAFile": str(d / "pki/ca.crt")},
                    },
                    "authorization": {"mode": "AlwaysAllow"},
                    "resolvConf": "",
                    "podLogsDir": str(d / "kubelet/pod-logs"),
                    "failSwapOn": False,
                    # Images are loaded by hand and never pulled: no image GC.
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "evictionHard": {
                        "memory.available": "50Mi",
                        "nodefs.available": "1%",
                        "imagefs.available": "1%",
                        "nodefs.inodesFree": "1%",
                    },
                    "serializeImagePulls": False,
                    "rotateCertificates": False,
                    "protectKernelDefaults": False,
                    "nodeStatusUpdateFrequency": "4s",
                    "syncFrequency": "10s",
                }
            )
        )
        (d / "kube-proxy.json").write_text(
            json.dumps(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "clientConnection": {"kubeconfig": str(d / "kube-proxy.kubeconfig")},
                    "mode": "iptables",
                    "hostnameOverride": NODE_NAME,
                    "bindAddress": NODE_IP,
                    "metricsBindAddress": "127.0.0.1:10249",
                    "healthzBindAddress": "127.0.0.1:10256",
                    "clusterCIDR": POD_RANGE,
                    # Pods and their Services' endpoints share one bridge: masquerade so replies return via NAT.
                    "iptables": {"masqueradeAll": True},
                    # 0 = leave the machine-wide conntrack settings alone.
                    "conntrack": {
                        "maxPerCore": 0,
                        "min": 0,
                        "tcpEstablishedTimeout": "0s",
                        "tcpCloseWaitTimeout": "0s",
                    },
                }
            )
        )

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.dir / "logs" / f"{name}.log").open("ab")
        self._logs.append(log)
        proc = subprocess.Popen(
            self._ns(*argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env(),
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def _wait(self, what: str, check: Callable[[], bool], proc: str, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.procs[proc].poll() is not None:
                raise NodeError(f"{proc} exited ({self.procs[proc].returncode}); {self._tail(proc)}")
            try:
                return bool(check())
            except Exception:  # not answering yet
                return False

        try:
            settled(ready, bool, what, timeout, every=0.25)
        except AssertionError:
            raise NodeError(f"{what} not up in {timeout:.0f}s; {self._tail(proc)}") from None

    def _tail(self, name: str) -> str:
        lines = (self.dir / "logs" / f"{name}.log").read_text(errors="replace").strip().splitlines()
        return f"log {self.dir}/logs/{name}.log ends: " + " | ".join(lines[-3:])[-600:]

    def _ok(self, url: str) -> bool:
        return self.run_in_netns("curl", "-fsS", "-o", "/dev/null", "--max-time", "2", url, check=False).returncode == 0

    def _start_control_plane(self) -> None:
        d, pki, kube, node = self.dir, self.dir / "pki", self.bins["kubernetes"], self.bins["node"]
        self._spawn(
            "etcd",
            [
                str(self.bins["etcd"] / "etcd"),
                f"--data-dir={d / 'etcd'}",
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=default=http://127.0.0.1:2380",
                "--listen-metrics-urls=",
                "--log-level=warn",
                "--unsafe-no-fsync",
            ],
        )
        self._wait("etcd", lambda: self._ok("http://127.0.0.1:2379/health"), "etcd")
        self._spawn(
            "kube-apiserver",
            [
                str(kube / "kube-apiserver"),
                "--etcd-servers=http://127.0.0.1:2379",
                f"--bind-address={NODE_IP}",
                f"--advertise-address={NODE_IP}",
                "--secure-port=6443",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                "--kubelet-preferred-address-types=InternalIP",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--authorization-mode=Node,RBAC",
                f"--service-cluster-ip-range={SERVICE_RANGE}",
                "--allow-privileged=false",
            ],
        )
        ca = str(pki / "ca.crt")
        admin = (str(pki / "admin.crt"), str(pki / "admin.key"))

        def api_ready() -> bool:
            args = ["curl", "-fsS", "-o", "/dev/null", "--max-time", "2", "--cacert", ca]
            args += ["--cert", admin[0], "--key", admin[1], f"https://{NODE_IP}:6443/readyz"]
            return self.run_in_netns(*args, check=False).returncode == 0

        self._wait("kube-apiserver", api_ready, "kube-apiserver")
        self._spawn(
            "kube-controller-manager",
            [
                str(kube / "kube-controller-manager"),
                f"--kubeconfig={d / 'controller-manager.kubeconfig'}",
                f"--authentication-kubeconfig={d / 'controller-manager.kubeconfig'}",
                f"--authorization-kubeconfig={d / 'controller-manager.kubeconfig'}",
                "--bind-address=127.0.0.1",
                "--use-service-account-credentials",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={ca}",
                # The node-lifecycle controller stays: it lifts the not-ready taint once the node is Ready.
                "--controllers=*,-node-ipam-controller",
                "--leader-elect=false",
                "--node-monitor-period=2s",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(node / "kube-scheduler"),
                f"--kubeconfig={d / 'scheduler.kubeconfig'}",
                f"--authentication-kubeconfig={d / 'scheduler.kubeconfig'}",
                f"--authorization-kubeconfig={d / 'scheduler.kubeconfig'}",
                "--bind-address=127.0.0.1",
                "--leader-elect=false",
            ],
        )

    def _start_containerd(self) -> None:
        c = self.dir / "containerd"
        self._spawn("containerd", ["containerd", f"--config={c / 'config.toml'}", "--log-level=warn"])
        sock = c / "containerd.sock"
        self._wait(
            "containerd",
            lambda: self.run_in_netns("ctr", f"--address={sock}", "version", check=False).returncode == 0,
            "containerd",
        )

    def _start_kubelet_and_proxy(self) -> None:
        d = self.dir
        self._spawn(
            "kubelet",
            [
                str(self.bins["node"] / "kubelet"),
                f"--config={d / 'kubelet/config.json'}",
                f"--kubeconfig={d / 'kubelet.kubeconfig'}",
                f"--root-dir={d / 'kubelet/root'}",
                f"--cert-dir={d / 'kubelet/pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
        )
        self._spawn(
            "kube-proxy",
            [str(self.bins["node"] / "kube-proxy"), f"--config={d / 'kube-proxy.json'}", "--v=1"],
        )

    def _wait_ready(self) -> None:
        def ready() -> bool:
            out = self.kubectl("get", "node", NODE_NAME, "-o", "json", check=False, timeout=10)
            if not out:
                return False
            node = json.loads(out)
            conditions = {c["type"]: c["status"] for c in node["status"].get("conditions", [])}
            taints = [t["key"] for t in node["spec"].get("taints", [])]
            return conditions.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in taints

        def default_account() -> bool:
            return bool(self.kubectl("get", "sa", "default", "-o", "name", check=False, timeout=10))

        self._wait("node Ready", ready, "kubelet", timeout=self.ready_timeout)
        self._wait("default ServiceAccount", default_account, "kube-controller-manager", timeout=30)

    # -- stop -----------------------------------------------------------------------------------

    def _ns_pids(self) -> list[int]:
        """Processes in the holder's mount namespace (containerd's shims too: they never leave it)."""
        if self.holder is None:
            return []
        try:
            mnt = Path(f"/proc/{self.holder.pid}/ns/mnt").readlink()
        except OSError:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != self.holder.pid:
                try:
                    if (entry / "ns/mnt").readlink() == mnt:
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    @staticmethod
    def _hierarchies() -> list[Path]:
        """The mounted cgroup hierarchies (v1 controllers, name=systemd, unified), each once."""
        seen: dict[Path, None] = {}
        for entry in sorted(Path("/sys/fs/cgroup").iterdir()):
            if entry.is_dir():
                seen.setdefault(entry.resolve(), None)
        return list(seen)

    def _make_cgroup_root(self) -> None:
        """The kubelet's cgroupRoot, one per node: its pods' cgroups never mix with anything else's."""
        for hierarchy in self._hierarchies():
            mine = hierarchy / self.cgroup
            mine.mkdir(exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):  # v1 cpuset starts empty: inherit the parent's
                if (hierarchy / name).exists() and not (mine / name).read_text().strip():
                    (mine / name).write_text((hierarchy / name).read_text())

    def _pod_cgroups(self) -> list[Path]:
        """This node's cgroups (under its cgroupRoot, in every hierarchy), deepest first, the root last."""
        if not self.cgroup:
            return []
        found: list[Path] = []
        for hierarchy in self._hierarchies():
            top = hierarchy / self.cgroup
            if top.is_dir():
                found += [Path(p) for p, _, _ in os.walk(top)]
        return sorted(found, key=lambda p: len(p.parts), reverse=True)

    def _kill_pods(self) -> None:
        def pod_pids() -> set[int]:
            pids: set[int] = set()
            for cg in self._pod_cgroups():
                with contextlib.suppress(OSError):
                    pids |= {int(p) for p in (cg / "cgroup.procs").read_text().split()}
            return pids

        _kill_until_gone(pod_pids, "the pods' processes")

    def stop(self) -> None:
        # Kubelet and proxy first (no restarts), then the pods, then the shims and containerd, then the rest.
        for name in ("kubelet", "kube-proxy"):
            self._terminate(name)
        self._kill_pods()
        for name in ("containerd", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            self._terminate(name)
        _kill_until_gone(lambda: set(self._ns_pids()), "the node's processes")
        self._kill_pods()
        for cg in self._pod_cgroups():
            with contextlib.suppress(OSError):
                cg.rmdir()
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def _terminate(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def leftovers(self) -> list[str]:
        """What stop() failed to remove (empty after a clean stop): processes, cgroups, the holder."""
        out = [f"pid {p}" for p in self._ns_pids()]
        out += [str(cg) for cg in self._pod_cgroups()]
        if self.holder is not None and self.holder.poll() is None:
            out.append(f"holder {self.holder.pid}")
        return out


def _kill_until_gone(found: Callable[[], set[int]], what: str) -> None:
    """SIGKILL what ``found()`` lists until it lists nothing (the kernel reaps them), for up to 5 s; what is left
    then is for :meth:`Node.leftovers` to report."""

    def kill() -> set[int]:
        pids = found()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    with contextlib.suppress(AssertionError):
        settled(kill, lambda left: not left, what, timeout=5.0, every=0.1)


if __name__ == "__main__":  # manual: python -m tests.servers.node DIR  (starts, reports, stops)
    with Node(Path(sys.argv[1])) as n:
        print(n.timings, n.kubectl("get", "nodes", "-o", "wide"))
    print("leftovers:", n.leftovers())
