"""The Kubernetes catalog source, through kubernetes_asyncio, against the real kube-apiserver and the double.

Every test both can answer runs twice, ``cluster`` being ``double`` or ``real`` (``tests/servers``; start it
with ``make servers``). One body drives both: :class:`Cluster` speaks the Kubernetes API with admin
credentials to set the scene and look at the result, while meshfed itself runs as the meshfed chart's own
ServiceAccount, with exactly the RBAC the chart grants (``helm install`` on the real server; on the double,
the chart rendered with ``helm template`` and its ServiceAccount and RBAC created through the API). Each
test works in fresh namespaces, deleted at its end, so order does not matter. The real server refuses
loopback endpoint addresses, so test EndpointSlices use 10.244.x.y. Faults the real server does not produce
on demand (410 Gone after compaction, 5xx, a body that is not JSON) are tested on the double only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import shutil
import ssl
import subprocess
import time
import tomllib
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from meshfed.catalog import KubernetesSettings, LocalImport, open_catalog
from meshfed.catalog.kubernetes import KubernetesCatalog
from meshfed.catalog.kubernetes_mirrors import MIRROR_LABEL, OWNER_LABEL, mirror_name
from meshfed.errors import CatalogError
from meshfed.zone import Zone
from tests.conftest import eventually, settled, until
from tests.doubles.kubernetes import KubernetesDouble, endpoint_slice, service
from tests.servers import DEFAULT_STATE, real_kubernetes
from tests.test_helm import IMAGE

FAST: dict[str, Any] = {"watch_timeout": 5, "initial_sync_timeout": 10.0, "backoff": (0.01, 0.05)}
REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "meshfed"
RELEASE = "east"
SERVICE_RANGE = ipaddress.ip_network("10.96.0.0/16")  # tests/servers/run.py SERVICE_RANGE
Document = dict[str, Any]

# kind -> (API prefix, plural, namespaced)
KINDS = {
    "Namespace": ("/api/v1", "namespaces", False),
    "Service": ("/api/v1", "services", True),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "EndpointSlice": ("/apis/discovery.k8s.io/v1", "endpointslices", True),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
}
PLURALS = {plural: kind for kind, (_, plural, _) in KINDS.items()}
RBAC_KINDS = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")


class ApiError(Exception):
    """A Status the API answered a request of the test's with."""

    def __init__(self, status: int, body: Document) -> None:
        super().__init__(f"{status}: {body.get('message')}")
        self.status = status
        self.body = body


def _helm() -> str:
    """helm from the real servers' build (tests/servers/build), the venv, or PATH."""
    path = Path(os.environ.get("MESHFED_TEST_SERVERS") or DEFAULT_STATE)
    candidates: list[str | None] = [json.loads(path.read_text()).get("helm")] if path.exists() else []
    candidates += [str(REPO / ".venv" / "bin" / "helm"), shutil.which("helm")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("helm is not installed; run 'make .venv/bin/helm' (tests/servers/build helm)")


def _run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, f"{' '.join(argv[:3])} failed: {result.stderr}"
    return result.stdout


class Cluster:
    """One API server (the double or the real one) as the tests drive it: admin calls, namespaces, meshfed."""

    def __init__(self, mode: str, tmp_path: Path) -> None:
        self.mode = mode
        self.tmp = tmp_path
        self.suffix = uuid.uuid4().hex[:6]
        # A zone of its own: a cluster-wide look for stale mirrors must not find another test's.
        self.zone = f"east-{self.suffix}"
        self.double: KubernetesDouble | None = None
        self.ca_file: str | None = None
        if mode == "double":
            self.double = KubernetesDouble()
            self.server, token, self.kube_version = self.double.url, self.double.admin_token, "1.37.0"
        else:
            real = real_kubernetes()
            self.real = real
            self.server, token, self.ca_file, self.kube_version = (
                real.server,
                real.admin_token,
                real.ca_file,
                real.version,
            )
        verify = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True
        self.http = httpx.Client(
            base_url=self.server, headers={"Authorization": f"Bearer {token}"}, verify=verify, timeout=30
        )
        self.helm = self.real.helm if mode == "real" else _helm()
        self._namespaces: list[str] = []
        self._hints: dict[str, int] = {}
        self._cluster_scoped: list[tuple[str, str]] = []
        self._releases: list[str] = []
        self.account: tuple[str, str] = ("", "")  # (namespace, name) of the last meshfed ServiceAccount

    # -- the API, as admin ------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Document | None = None) -> Document:
        response = self.http.request(method, path, json=body)
        document: Document = response.json()
        if not response.is_success:
            raise ApiError(response.status_code, document)
        return document

    @staticmethod
    def path(kind: str, namespace: str | None = None, name: str | None = None) -> str:
        prefix, plural, namespaced = KINDS[kind]
        where = f"{prefix}/namespaces/{namespace}/{plural}" if namespaced and namespace else f"{prefix}/{plural}"
        return f"{where}/{name}" if name else where

    def create(self, document: Document) -> Document:
        metadata = document["metadata"]
        if not KINDS[document["kind"]][2] and (document["kind"], metadata["name"]) not in self._cluster_scoped:
            self._cluster_scoped.append((document["kind"], metadata["name"]))
        return self.request("POST", self.path(document["kind"], metadata.get("namespace")), document)

    def replace(self, document: Document) -> Document:
        metadata = document["metadata"]
        return self.request("PUT", self.path(document["kind"], metadata.get("namespace"), metadata["name"]), document)

    def get(self, plural: str, namespace: str, name: str) -> Document | None:
        try:
            return self.request("GET", self.path(PLURALS[plural], namespace, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def delete(self, plural: str, namespace: str, name: str) -> None:
        self.request("DELETE", self.path(PLURALS[plural], namespace, name))

    def items(self, plural: str, namespace: str | None = None, selector: str | None = None) -> list[Document]:
        params = {"labelSelector": selector} if selector else {}
        response = self.http.get(self.path(PLURALS[plural], namespace), params=params)
        assert response.is_success, response.text
        items: list[Document] = response.json()["items"]
        return sorted(items, key=lambda item: (item["metadata"].get("namespace", ""), item["metadata"]["name"]))

    def names(self, plural: str, namespace: str, selector: str | None = None) -> list[str]:
        return [item["metadata"]["name"] for item in self.items(plural, namespace, selector)]

    def namespace(self, hint: str) -> str:
        """A fresh namespace for this test, deleted at its end."""
        self._hints[hint] = self._hints.get(hint, 0) + 1
        name = f"{hint}-{self.suffix}" if self._hints[hint] == 1 else f"{hint}{self._hints[hint]}-{self.suffix}"
        self.request(
            "POST", self.path("Namespace"), {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        )
        self._namespaces.append(name)
        return name

    # -- meshfed, as the chart's ServiceAccount ---------------------------------------------------------

    def install(self, watched: list[str], mirror: str | None = None) -> Path:
        """Install the chart for ``watched`` (mirrors into ``mirror``, else its namespace); its account's kubeconfig."""
        return self.install_chart(
            [
                "--set",
                "catalog.mode=kubernetes",
                "--set",
                "persistence.enabled=false",
                "--set-json",
                f"catalog.kubernetes.namespaces={json.dumps(watched)}",
                "--set",
                f"catalog.kubernetes.mirrorNamespace={mirror or ''}",
            ]
        )

    def install_chart(self, chart_values: list[str]) -> Path:
        """Install the chart with ``chart_values`` into a namespace of its own; its account's kubeconfig."""
        release_namespace = self.namespace("meshfed")
        values = [*IMAGE, "--set", f"zone.name={self.zone}", *chart_values]
        template = [
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            release_namespace,
            "--kube-version",
            self.kube_version,
        ]
        rendered = _run(self.helm, *template, *values)
        manifests = [document for document in yaml.safe_load_all(rendered) if document]
        (account,) = [m["metadata"]["name"] for m in manifests if m["kind"] == "ServiceAccount"]
        self.account = (release_namespace, account)
        if self.mode == "real":
            kubeconfig = self.real.admin_kubeconfig
            _run(
                self.helm,
                "install",
                RELEASE,
                str(CHART),
                "--namespace",
                release_namespace,
                "--kubeconfig",
                kubeconfig,
                *values,
            )
            self._releases.append(release_namespace)
            token = _run(
                self.real.kubectl, "--kubeconfig", kubeconfig, "create", "token", account, "-n", release_namespace
            )
        else:
            # The double holds no workloads: only what the chart gives the catalog its identity and rights with.
            for manifest in manifests:
                if manifest["kind"] in RBAC_KINDS:
                    if KINDS[manifest["kind"]][2]:
                        manifest["metadata"].setdefault("namespace", release_namespace)
                    self.create(manifest)
            path = self.path("ServiceAccount", release_namespace, account) + "/token"
            token = self.request("POST", path, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest"})[
                "status"
            ]["token"]
        return self.kubeconfig(token.strip())

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.account[0]}:{self.account[1]}"

    def kubeconfig(self, token: str) -> Path:
        cluster: Document = {"server": self.server}
        if self.ca_file:
            cluster["certificate-authority"] = self.ca_file
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": cluster}],
            "users": [{"name": "meshfed", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "meshfed"}}],
            "current-context": "test",
        }
        path = self.tmp / f"kubeconfig-{uuid.uuid4().hex[:6]}"
        path.write_text(json.dumps(document))
        return path

    def grant(self, namespace: str | None, rules: list[Document]) -> None:
        """Give the last installed ServiceAccount ``rules`` in ``namespace`` (cluster-wide if None)."""
        role, binding = ("Role", "RoleBinding") if namespace else ("ClusterRole", "ClusterRoleBinding")
        name = f"extra-{self.suffix}-{uuid.uuid4().hex[:4]}"
        metadata: Document = {"name": name, **({"namespace": namespace} if namespace else {})}
        rbac = "rbac.authorization.k8s.io/v1"
        self.create({"apiVersion": rbac, "kind": role, "metadata": metadata, "rules": rules})
        subject = {"kind": "ServiceAccount", "name": self.account[1], "namespace": self.account[0]}
        ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": role, "name": name}
        self.create({"apiVersion": rbac, "kind": binding, "metadata": metadata, "roleRef": ref, "subjects": [subject]})

    def catalog(
        self,
        kubeconfig: Path,
        namespaces: list[str],
        mirror_namespace: str | None = None,
        mirror_selector: dict[str, str] | None = None,
    ) -> KubernetesCatalog:
        settings = KubernetesSettings(
            kubeconfig=str(kubeconfig),
            namespaces=namespaces,
            mirror_namespace=mirror_namespace,
            mirror_selector=mirror_selector,
        )
        return KubernetesCatalog(settings, zone=self.zone, **FAST)

    def source(
        self, namespaces: list[str], mirror_namespace: str | None = None, *, chart_mirror: str | None = None
    ) -> KubernetesCatalog:
        """meshfed watching ``namespaces``, as the chart installed for them (and ``chart_mirror``) runs it."""
        kubeconfig = self.install(namespaces, chart_mirror or mirror_namespace)
        return self.catalog(kubeconfig, namespaces, mirror_namespace)

    def close(self) -> None:
        try:
            for release_namespace in self._releases:
                _run(
                    self.helm,
                    "uninstall",
                    RELEASE,
                    "--namespace",
                    release_namespace,
                    "--kubeconfig",
                    self.real.admin_kubeconfig,
                )
            for kind, name in self._cluster_scoped:  # no namespace takes these along
                self.request("DELETE", self.path(kind, name=name))
            for namespace in self._namespaces:
                self.request("DELETE", self.path("Namespace", name=namespace))
        finally:
            self.http.close()
            if self.double is not None:
                self.double.close()


@pytest.fixture(params=["double", "real"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    kube = Cluster(request.param, tmp_path)
    try:
        yield kube
    finally:
        kube.close()


@pytest.fixture
def double_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """The double alone: for the faults the real server does not produce on demand."""
    kube = Cluster("double", tmp_path)
    try:
        yield kube
    finally:
        kube.close()


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def imported(service_name: str, namespace: str = "default", peer: str = "west", port: int = 15001) -> LocalImport:
    return LocalImport(peer=peer, service=service_name, namespace=namespace, ports={"http": ("10.244.0.5", port)})


def mirrors_of(cluster: Cluster, plural: str, namespace: str) -> dict[str, Document]:
    """This zone's mirrors of ``plural`` in ``namespace``, by the import each mirrors."""
    items = cluster.items(plural, namespace, f"{MIRROR_LABEL}=true,{OWNER_LABEL}={cluster.zone}")
    return {item["metadata"]["annotations"]["meshfed.io/import"]: item for item in items}


def assert_whole(cluster: Cluster, namespace: str, item: LocalImport) -> None:
    """``item`` is mirrored whole: a Service and its EndpointSlice, on the import's egress address and ports."""
    name = mirror_name(cluster.zone, item)
    mirror, endpoints = cluster.get("services", namespace, name), cluster.get("endpointslices", namespace, name)
    assert mirror is not None, f"no Service {namespace}/{name} for {item.name}"
    assert endpoints is not None, f"no EndpointSlice {namespace}/{name} for {item.name}"
    ports = sorted(item.ports.items())
    assert [(p["name"], p["port"], p["targetPort"]) for p in mirror["spec"]["ports"]] == [
        (port_name, port, port) for port_name, (_, port) in ports
    ]
    assert endpoints["metadata"]["labels"]["kubernetes.io/service-name"] == name
    assert [(p["name"], p["port"]) for p in endpoints["ports"]] == [(port_name, port) for port_name, (_, port) in ports]
    assert endpoints["endpoints"] == [{"addresses": [ports[0][1][0]], "conditions": {"ready": True}}]


# -- reading the zone's services --------------------------------------------------------------------------


def test_lists_services_with_ready_endpoints_ports_and_zones(cluster: Cluster) -> None:
    shop, data, elsewhere = cluster.namespace("shop"), cluster.namespace("data"), cluster.namespace("elsewhere")
    cluster.create(service("web", shop, ports={"http": 80, "metrics": 9100}, labels={"app": "web"}))
    endpoints = [("10.244.0.7", True, "eu-1a"), ("10.244.0.8", False, ""), ("10.244.0.9", None, "")]
    cluster.create(endpoint_slice("web", endpoints, 8080, namespace=shop))
    cluster.create(service("other", elsewhere))  # not a watched namespace
    cluster.create(service("db", data, ports={"sql": 5432}))
    external = service("legacy", shop)
    external["spec"] = {"type": "ExternalName", "externalName": "legacy.example.com"}
    cluster.create(external)

    async def scenario() -> None:
        catalog = cluster.source([shop, data])
        try:
            snapshot = await catalog.snapshot()
        finally:
            await catalog.aclose()
        assert [s.key for s in snapshot.services] == sorted([(data, "db"), (shop, "web")])
        web = snapshot.service(shop, "web")
        assert web is not None
        assert web.ports == {"http": 80, "metrics": 9100}
        assert web.labels == {"app": "web"}
        assert [(e.address, e.port, e.healthy, e.locality.zone) for e in web.endpoints] == [
            ("10.244.0.7", 8080, True, "eu-1a"),
            ("10.244.0.8", 8080, False, ""),
            ("10.244.0.9", 8080, True, ""),  # ready unset reads as ready, as the API documents
        ]

    run(scenario)


def test_watch_delivers_changes_at_once(cluster: Cluster) -> None:
    shop = cluster.namespace("shop")
    cluster.create(service("web", shop))

    async def scenario() -> None:
        catalog = cluster.source([shop])
        try:
            first = await catalog.snapshot()
            assert (await catalog.watch(first.version, 0.3)).version == first.version
            started = time.monotonic()
            cluster.create(endpoint_slice("web", [("10.244.0.7", True, "")], 8080, namespace=shop))
            changed = await catalog.watch(first.version, 5.0)
            assert time.monotonic() - started < 2.0, "the watch stream should deliver the change at once"
            assert [e.address for e in changed.services[0].endpoints] == ["10.244.0.7"]
            cluster.create(service("api", shop, ports={"grpc": 9090}))
            cluster.delete("endpointslices", shop, "web-abcde")
            after = await until(
                catalog, lambda s: s.service(shop, "api") is not None and not s.services[-1].endpoints, timeout=10
            )
            assert after.version > changed.version
            assert catalog.recent_errors == [], "every list and watch was answered"
        finally:
            await catalog.aclose()

    run(scenario)


def test_relists_after_410_gone(double_cluster: Cluster) -> None:
    double = double_cluster.double
    assert double is not None
    shop = double_cluster.namespace("shop")
    double_cluster.create(service("web", shop))
    double_cluster.create(endpoint_slice("web", [("10.244.0.7", True, "")], 8080, namespace=shop))

    async def scenario() -> None:
        catalog = double_cluster.source([shop])
        try:
            first = await catalog.snapshot()
            # History compacted while changes happen: the watch gets 410 Gone and the source lists again.
            double.compact()
            double_cluster.create(service("api", shop, ports={"grpc": 9090}))
            double_cluster.delete("endpointslices", shop, "web-abcde")
            after = await until(catalog, lambda s: s.service(shop, "api") is not None and not s.services[-1].endpoints)
            assert after.version > first.version
            assert catalog.last_error is None
        finally:
            await catalog.aclose()
        lists = [query for method, path, query in double.requests if path.endswith(("/services", "/endpointslices"))]
        assert all(query.get("allowWatchBookmarks") for query in lists if query.get("watch"))
        relists = [query for query in lists if not query.get("watch") and not query.get("labelSelector")]
        assert len(relists) >= 4, "each kind is listed once at start and again after 410"

    run(scenario)


def test_bad_responses_keep_the_last_good_snapshot_and_say_what_happened(double_cluster: Cluster) -> None:
    double = double_cluster.double
    assert double is not None
    shop = double_cluster.namespace("shop")
    double_cluster.create(service("web", shop))

    async def scenario() -> None:
        catalog = double_cluster.source([shop])
        try:
            good = await catalog.snapshot()
            double.compact()  # the next watch fails over to a list, which now fails
            double.fail_next(3, 500)
            double.apply(service("api", shop))
            await eventually(lambda: any("injected by the test" in error for error in catalog.recent_errors))
            double.compact()
            double.fail_next(2, 200, body="<html>not an API server</html>")
            double.apply(service("db", shop))
            await eventually(lambda: any("not JSON" in error for error in catalog.recent_errors))
            assert all(error.startswith(f"the Kubernetes API at {double.url}") for error in catalog.recent_errors)
            assert (await catalog.watch(0, 0.1)).service(shop, "web") is not None
            recovered = await until(catalog, lambda s: [x.name for x in s.services] == ["api", "db", "web"])
            assert recovered.version > good.version
        finally:
            await catalog.aclose()

    run(scenario)


# -- mirroring imports -------------------------------------------------------------------------------------


def test_publish_imports_mirrors_services_and_removes_stale_ones(cluster: Cluster) -> None:
    shop, mirrors = cluster.namespace("shop"), cluster.namespace("imports")
    cluster.create(service("web", shop))
    # Someone else's Service and a mirror of another zone, in the mirror namespace: never touched.
    cluster.create(service("keep-me", mirrors))
    north = LocalImport(peer="north", service="api", namespace="default", ports={"http": ("10.244.1.1", 15001)})
    labels = {MIRROR_LABEL: "true", OWNER_LABEL: "west"}
    cluster.create(service(mirror_name("west", north), mirrors, labels=labels))
    api = imported("api")
    db = LocalImport(
        peer="north",
        service="db",
        namespace="data",
        ports={"sql": ("10.244.0.5", 15002), "admin": ("10.244.0.5", 15003)},
    )

    async def scenario() -> None:
        catalog = cluster.source([shop, mirrors], mirror_namespace=mirrors)
        try:
            await catalog.snapshot()
            await catalog.publish_imports([api, db])
            services = mirrors_of(cluster, "services", mirrors)
            assert sorted(services) == ["api.default.west", "db.data.north"]
            assert_whole(cluster, mirrors, api)
            assert_whole(cluster, mirrors, db)
            mirror = services["api.default.west"]
            assert mirror["metadata"]["name"] == mirror_name(cluster.zone, api)
            assert mirror["metadata"]["labels"] == {
                MIRROR_LABEL: "true",
                OWNER_LABEL: cluster.zone,
                "meshfed.io/peer": "west",
                "meshfed.io/service": "api",
                "meshfed.io/namespace": "default",
            }
            assert "selector" not in mirror["spec"]
            assert ipaddress.ip_address(mirror["spec"]["clusterIP"]) in SERVICE_RANGE
            endpoints = mirrors_of(cluster, "endpointslices", mirrors)["api.default.west"]
            # A label value the API server admits (it refuses "meshfed.io/controller": no "/" in a value).
            assert endpoints["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == "controller.meshfed.io"

            # Mirrors are not this zone's services: once a Service made after them shows, they still do not.
            cluster.create(service("marker", mirrors))
            seen = await until(catalog, lambda s: s.service(mirrors, "marker") is not None, timeout=10)
            assert sorted(s.name for s in seen.services) == ["keep-me", "marker", "web"]

            before = {
                item["metadata"]["name"]: item["metadata"]["resourceVersion"]
                for item in cluster.items("services", mirrors)
            }
            writes = len(cluster.double.requests) if cluster.double else 0
            await catalog.publish_imports([api, db])  # unchanged: nothing rewritten
            after = {
                item["metadata"]["name"]: item["metadata"]["resourceVersion"]
                for item in cluster.items("services", mirrors)
            }
            assert after == before
            if cluster.double:
                assert not [r for r in cluster.double.requests[writes:] if r[0] in ("POST", "PUT", "DELETE")]

            moved = imported("api", port=15009)
            allocated = mirror["spec"]["clusterIP"]
            await catalog.publish_imports([moved])
            assert_whole(cluster, mirrors, moved)
            (updated,) = mirrors_of(cluster, "services", mirrors).values()
            assert updated["spec"]["clusterIP"] == allocated, "an update keeps what the server allocated"
            assert list(mirrors_of(cluster, "endpointslices", mirrors)) == ["api.default.west"]

            await catalog.publish_imports([])
            assert mirrors_of(cluster, "services", mirrors) == {}
            assert mirrors_of(cluster, "endpointslices", mirrors) == {}
            assert cluster.names("services", mirrors) == sorted(["keep-me", "marker", mirror_name("west", north)])
        finally:
            await catalog.aclose()

    run(scenario)


def test_mirrors_select_the_gateway_pods_when_told_to_and_kubernetes_keeps_their_endpoints(tmp_path: Path) -> None:
    """``mirror_selector``: each mirror a Service selecting the gateway replicas' pods, whose EndpointSlices the
    API server's own controller writes (so the real server only: the double has no such controller)."""
    cluster = Cluster("real", tmp_path)
    selector = {"app.kubernetes.io/component": "gateway", "app.kubernetes.io/instance": cluster.zone}
    try:
        shop, mirrors = cluster.namespace("shop"), cluster.namespace("imports")
        kubeconfig = cluster.install([shop], mirrors)
        api = imported("api")
        name = mirror_name(cluster.zone, api)

        def slices() -> list[Document]:
            return cluster.items("endpointslices", mirrors, f"kubernetes.io/service-name={name}")

        async def scenario() -> None:
            plain = cluster.catalog(kubeconfig, [shop], mirrors)
            selecting = cluster.catalog(kubeconfig, [shop], mirrors, selector)
            try:
                await plain.publish_imports([api])
                assert_whole(cluster, mirrors, api)
                # Switched to selecting: the Service selects the pods, and this zone's EndpointSlice is gone.
                await selecting.publish_imports([api])
                mirror = cluster.get("services", mirrors, name)
                assert mirror is not None
                assert mirror["spec"]["selector"] == selector
                assert [(p["name"], p["port"], p["targetPort"]) for p in mirror["spec"]["ports"]] == [
                    ("http", 15001, 15001)
                ]
                assert cluster.get("endpointslices", mirrors, name) is None
                # The API server's EndpointSlice controller writes the Service's slice (with its labels)...
                (kept,) = settled(slices, lambda found: len(found) == 1, "the controller's EndpointSlice", every=0.1)
                assert kept["metadata"]["labels"][MIRROR_LABEL] == "true"
                assert kept["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] != "controller.meshfed.io"
                # ...which is not this zone's to delete as stale: publishing again changes nothing.
                version = mirror["metadata"]["resourceVersion"]
                await selecting.publish_imports([api])
                assert [item["metadata"]["uid"] for item in slices()] == [kept["metadata"]["uid"]]
                again = cluster.get("services", mirrors, name)
                assert again is not None
                assert again["metadata"]["resourceVersion"] == version
                # And back: no selector, this zone's EndpointSlice at the egress address again.
                await plain.publish_imports([api])
                after = cluster.get("services", mirrors, name)
                assert after is not None
                assert "selector" not in after["spec"]
                assert_whole(cluster, mirrors, api)
                await selecting.publish_imports([])
                assert cluster.get("services", mirrors, name) is None
            finally:
                await plain.aclose()
                await selecting.aclose()

        run(scenario)
    finally:
        cluster.close()


def test_a_mirror_selector_without_a_mirror_namespace_or_with_a_bad_label_is_refused() -> None:
    with pytest.raises(ValueError, match="mirror_selector needs mirror_namespace"):
        KubernetesSettings(mirror_selector={"app": "gateway"})
    for bad in ({"app": "not a value!"}, {"-app": "gateway"}, {"a/b/c": "x"}):
        with pytest.raises(ValueError, match="is not a label the API server takes"):
            KubernetesSettings(mirror_namespace="meshfed", mirror_selector=bad)


def test_mirror_names_never_collide(cluster: Cluster) -> None:
    mirrors = cluster.namespace("imports")
    long_service, long_peer = "s" * 30 + "-" + "v" * 32, "p" * 63
    imports = [
        # One mirror namespace for imports from several namespaces: these were both "web-west".
        imported("web", "default", port=15001),
        imported("web", "shop", port=15002),
        # Dashes: these were both "a-b-c".
        imported("a-b", peer="c", port=15003),
        imported("a", peer="b-c", port=15004),
        # Longer than a name may be, once joined; and a service name starting with a digit.
        imported(long_service, peer=long_peer, port=15005),
        imported(long_service, peer=long_peer, namespace="shop", port=15006),
        imported("9lives", port=15007),
    ]

    async def scenario() -> None:
        catalog = cluster.source([mirrors], mirror_namespace=mirrors)
        try:
            await catalog.publish_imports(imports)
        finally:
            await catalog.aclose()
        assert sorted(mirrors_of(cluster, "services", mirrors)) == sorted(item.name for item in imports)
        for item in imports:
            assert_whole(cluster, mirrors, item)

    run(scenario)


def test_without_a_mirror_namespace_mirrors_live_with_their_import(cluster: Cluster) -> None:
    shop, data = cluster.namespace("shop"), cluster.namespace("data")
    imports = [imported("web", shop), imported("db", data, port=15002)]

    async def scenario() -> None:
        catalog = cluster.source([shop])
        # Beyond the chart: the writes in each import's namespace, and the cluster-wide list for stale mirrors.
        writer = ["get", "list", "create", "update", "delete"]
        for namespace in (shop, data):
            cluster.grant(
                namespace,
                [{"apiGroups": ["", "discovery.k8s.io"], "resources": ["services", "endpointslices"], "verbs": writer}],
            )
        cluster.grant(
            None,
            [{"apiGroups": ["", "discovery.k8s.io"], "resources": ["services", "endpointslices"], "verbs": ["list"]}],
        )
        try:
            await catalog.publish_imports(imports)
            assert_whole(cluster, shop, imports[0])
            assert_whole(cluster, data, imports[1])
            await catalog.publish_imports(imports[:1])
            assert mirrors_of(cluster, "services", data) == {}
            assert mirrors_of(cluster, "endpointslices", data) == {}
        finally:
            await catalog.aclose()

    run(scenario)


def test_one_refused_import_neither_stops_the_others_nor_stays_half_applied(cluster: Cluster) -> None:
    shop, mirrors = cluster.namespace("shop"), cluster.namespace("imports")
    taken, half, owned_elsewhere, fine = (
        imported("web"),
        imported("api", port=15002),
        imported("cart", port=15003),
        imported("db", port=15004),
    )
    # Someone's own Service holds one import's mirror name, someone's EndpointSlice another's,
    # and a third is labelled as another zone's.
    user_service = cluster.create(service(mirror_name(cluster.zone, taken), mirrors))
    theirs = endpoint_slice("theirs", [("10.244.3.3", True, "")], 8080, namespace=mirrors)
    theirs["metadata"]["name"] = mirror_name(cluster.zone, half)
    user_slice = cluster.create(theirs)
    labels = {MIRROR_LABEL: "true", OWNER_LABEL: "north"}
    north_service = cluster.create(service(mirror_name(cluster.zone, owned_elsewhere), mirrors, labels=labels))
    foreign = {"services": [user_service, north_service], "endpointslices": [user_slice]}

    def untouched() -> None:
        for plural, items in foreign.items():
            for item in items:
                now = cluster.get(plural, mirrors, item["metadata"]["name"])
                assert now is not None
                assert now["metadata"]["resourceVersion"] == item["metadata"]["resourceVersion"]

    async def scenario() -> None:
        catalog = cluster.source([shop], mirror_namespace=mirrors)
        try:
            with pytest.raises(CatalogError) as caught:
                await catalog.publish_imports([taken, half, owned_elsewhere, fine])
            message = str(caught.value)
            assert "3 change(s) failed, the others are applied" in message
            assert (
                f"web.default.west: Service {mirrors}/{mirror_name(cluster.zone, taken)} exists and is not managed by "
                f"meshfed zone {cluster.zone}; rename or delete it" in message
            )
            assert (
                f"api.default.west: EndpointSlice {mirrors}/{mirror_name(cluster.zone, half)} exists and is not managed"
                in message
            )
            assert (
                f"cart.default.west: Service {mirrors}/{mirror_name(cluster.zone, owned_elsewhere)} exists and is not "
                f"managed by meshfed zone {cluster.zone} (it is labelled {OWNER_LABEL}=north)" in message
            )
            assert_whole(cluster, mirrors, fine)
            # The Service made for the refused EndpointSlice went again: none without endpoints is left.
            assert cluster.get("services", mirrors, mirror_name(cluster.zone, half)) is None
            untouched()
            await catalog.publish_imports([fine])  # never deletes what it does not own either
            untouched()

            # Once the names are free, the next publish mirrors the rest.
            cluster.delete("services", mirrors, mirror_name(cluster.zone, taken))
            cluster.delete("endpointslices", mirrors, mirror_name(cluster.zone, half))
            cluster.delete("services", mirrors, mirror_name(cluster.zone, owned_elsewhere))
            await catalog.publish_imports([taken, half, owned_elsewhere, fine])
            for item in (taken, half, owned_elsewhere, fine):
                assert_whole(cluster, mirrors, item)
        finally:
            await catalog.aclose()

    run(scenario)


def test_mirrors_deleted_out_of_band_come_back_on_the_next_publish(cluster: Cluster) -> None:
    # The mirror namespace is not watched: the chart's mirror Role alone must do.
    shop, mirrors = cluster.namespace("shop"), cluster.namespace("imports")
    web, api, db = imported("web"), imported("api", port=15002), imported("db", port=15003)

    async def scenario() -> None:
        catalog = cluster.source([shop], mirror_namespace=mirrors)
        try:
            await catalog.publish_imports([web, api, db])
            cluster.delete("services", mirrors, mirror_name(cluster.zone, web))
            cluster.delete("endpointslices", mirrors, mirror_name(cluster.zone, api))
            cluster.delete("services", mirrors, mirror_name(cluster.zone, db))
            cluster.delete("endpointslices", mirrors, mirror_name(cluster.zone, db))
            await catalog.publish_imports([web, api, db])
            for item in (web, api, db):
                assert_whole(cluster, mirrors, item)
        finally:
            await catalog.aclose()

    run(scenario)


def test_loopback_egress_is_refused_before_anything_is_written(cluster: Cluster) -> None:
    mirrors = cluster.namespace("imports")
    loopback = LocalImport(peer="west", service="web", namespace="default", ports={"http": ("127.0.0.1", 15001)})

    async def scenario() -> None:
        catalog = cluster.source([mirrors], mirror_namespace=mirrors)
        try:
            with pytest.raises(CatalogError) as caught:
                await catalog.publish_imports([imported("api"), loopback])
        finally:
            await catalog.aclose()
        assert str(caught.value) == (
            "egress address 127.0.0.1 is loopback; the API server refuses it in an EndpointSlice — run `meshfed up` "
            "with --egress-advertise-host set to an address pods can reach (the pod IP), and --egress-host set to "
            "bind it (such as 0.0.0.0)"
        )
        assert cluster.items("services", mirrors) == []
        assert cluster.items("endpointslices", mirrors) == []

    run(scenario)
    # What meshfed spares the operator: the API server refuses it.
    with pytest.raises(ApiError) as refused:
        cluster.create(endpoint_slice("web", [("127.0.0.1", True, "")], 8080, namespace=mirrors))
    assert refused.value.status == 422
    assert refused.value.body["message"] == (
        'EndpointSlice.discovery.k8s.io "web-abcde" is invalid: endpoints[0].addresses[0]: Invalid value: '
        '"127.0.0.1": may not be in the loopback range (127.0.0.0/8, ::1/128)'
    )


@pytest.mark.parametrize(
    ("host", "problem"),
    [("127.0.0.1", "loopback"), ("::1", "loopback"), ("0.0.0.0", "unspecified"), ("169.254.1.2", "link-local"),
     ("fe80::1", "link-local"), ("224.0.0.5", "link-local"), ("::ffff:127.0.0.1", "loopback")],
)  # fmt: skip
def test_egress_addresses_the_api_server_refuses_are_refused_up_front(host: str, problem: str) -> None:
    # Never started: the check comes before any request.
    catalog = KubernetesCatalog(KubernetesSettings(kubeconfig="unused"), zone="east")
    item = LocalImport(peer="west", service="web", namespace="default", ports={"http": (host, 15001)})
    with pytest.raises(
        CatalogError, match=rf"egress address {re.escape(host)} is {problem}; .*--egress-advertise-host"
    ):
        asyncio.run(catalog.publish_imports([item]))
    named = item.model_copy(update={"ports": {"http": ("gateway.local", 15001)}})
    with pytest.raises(CatalogError, match=r"'gateway.local' is not an IP address.*--egress-advertise-host"):
        asyncio.run(catalog.publish_imports([named]))


def test_the_chart_grants_exactly_what_the_source_uses(double_cluster: Cluster) -> None:
    """The real server proves the chart's RBAC suffices (every test runs as its account); this, that it is no wider."""
    double = double_cluster.double
    assert double is not None
    shop, mirrors = double_cluster.namespace("shop"), double_cluster.namespace("imports")
    web = imported("web")
    double_cluster.create(service(mirror_name(double_cluster.zone, imported("taken")), mirrors))
    endpoints = endpoint_slice("theirs", [("10.244.3.3", True, "")], 8080, namespace=mirrors)
    endpoints["metadata"]["name"] = mirror_name(double_cluster.zone, imported("half"))
    double_cluster.create(endpoints)

    async def scenario() -> None:
        catalog = double_cluster.source([shop], mirror_namespace=mirrors)
        try:
            await catalog.snapshot()  # list in the watched namespace, then watch
            await catalog.publish_imports([web])  # list and create in the mirror namespace
            await catalog.publish_imports([imported("web", port=15009)])  # update
            with pytest.raises(CatalogError):
                # get (whose is the name?), and delete: the stale mirror, and a Service whose EndpointSlice failed
                await catalog.publish_imports([imported("taken"), imported("half")])
            watched = {"services", "endpointslices"}
            await eventually(lambda: {a[3] for a in double.authorizations if a[1] == "watch"} == watched)
        finally:
            await catalog.aclose()

    run(scenario)
    used = {
        (verb, resource, namespace)
        for user, verb, _, resource, namespace in double.authorizations
        if user == double_cluster.user
    }
    granted: set[tuple[str, str, str]] = set()
    for namespace in (shop, mirrors):
        bindings = double_cluster.items("rolebindings", namespace)
        for binding in bindings:
            role = double_cluster.get("roles", namespace, binding["roleRef"]["name"])
            assert role is not None
            for rule in role["rules"]:
                granted |= {(verb, resource, namespace) for verb in rule["verbs"] for resource in rule["resources"]}
    assert double_cluster.items("clusterrolebindings") == [], "the chart needs no cluster-wide rights"
    assert used == granted


# -- what errors say ---------------------------------------------------------------------------------------


def test_unauthorized_says_to_check_the_credentials_not_rbac(cluster: Cluster) -> None:
    shop = cluster.namespace("shop")
    kubeconfig = cluster.kubeconfig("not-a-token-this-server-issued")

    async def scenario() -> None:
        catalog = KubernetesCatalog(
            KubernetesSettings(kubeconfig=str(kubeconfig), namespaces=[shop]),
            zone="east",
            initial_sync_timeout=2.0,
            backoff=(0.01, 0.05),
        )
        try:
            with pytest.raises(CatalogError) as caught:
                await catalog.snapshot()
        finally:
            await catalog.aclose()
        message = str(caught.value)
        assert "did not accept meshfed's credentials (401 Unauthorized" in message
        assert f"is the token expired, revoked or for another cluster? check the user of {kubeconfig}" in message
        assert "RBAC" not in message
        assert "Role" not in message

    run(scenario)


def test_forbidden_names_the_missing_permission_and_where(cluster: Cluster) -> None:
    shop, mirrors, other = cluster.namespace("shop"), cluster.namespace("imports"), cluster.namespace("other")
    kubeconfig = cluster.install([shop], mirrors)

    async def refusal(catalog: KubernetesCatalog, action: Callable[[], Coroutine[Any, Any, object]]) -> str:
        try:
            with pytest.raises(CatalogError) as caught:
                await action()
        finally:
            await catalog.aclose()
        return str(caught.value)

    async def scenario() -> None:
        # The chart confines writes to its mirror namespace; without one meshfed looks for stale mirrors everywhere.
        catalog = cluster.catalog(kubeconfig, [shop])
        message = await refusal(catalog, lambda: catalog.publish_imports([imported("web", shop)]))
        assert f"forbids {cluster.user} to list services at the cluster scope — grant it with a ClusterRole" in message
        assert "or set [kubernetes] mirror_namespace" in message
        assert (
            f'(403 Forbidden: services is forbidden: User "{cluster.user}" cannot list resource "services" in API '
            'group "" at the cluster scope)'
        ) in message
        assert "401" not in message.replace(cluster.user, "<user>")  # the user's random suffix may hold "401"

        # Mirroring into a namespace the chart lets it read but not write.
        catalog = cluster.catalog(kubeconfig, [shop], mirror_namespace=shop)
        message = await refusal(catalog, lambda: catalog.publish_imports([imported("web", shop)]))
        assert f"web.{shop}.west: the Kubernetes API forbids {cluster.user} to create services in namespace {shop}" in (
            message
        )

        # Watching a namespace the chart was not told about.
        catalog = cluster.catalog(kubeconfig, [other])
        message = await refusal(catalog, catalog.snapshot)
        user = re.escape(cluster.user)
        assert re.search(
            rf"forbids {user} to list (services|endpointslices.discovery.k8s.io) in namespace {other}", message
        )

    run(scenario)


def test_missing_credentials_say_what_to_check(tmp_path: Path) -> None:
    async def missing() -> None:
        catalog = KubernetesCatalog(KubernetesSettings(kubeconfig=str(tmp_path / "nope")), zone="east")
        try:
            with pytest.raises(CatalogError, match=r"cannot load Kubernetes credentials from .*nope"):
                await catalog.snapshot()
        finally:
            await catalog.aclose()

    run(missing)

    async def not_in_cluster() -> None:
        catalog = KubernetesCatalog(KubernetesSettings(), zone="east")
        try:
            with pytest.raises(CatalogError, match=r"in-cluster service account.*set \[kubernetes\] kubeconfig"):
                await catalog.snapshot()
        finally:
            await catalog.aclose()

    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        run(not_in_cluster)


# -- where the double must agree with the real server ------------------------------------------------------


def test_the_api_server_refuses_invalid_label_values_and_names(cluster: Cluster) -> None:
    shop = cluster.namespace("shop")
    bad_label = endpoint_slice("web", [("10.244.0.7", True, "")], 8080, namespace=shop)
    bad_label["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] = "meshfed.io/controller"
    with pytest.raises(ApiError) as refused:
        cluster.create(bad_label)
    detail = (
        "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must "
        "start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for "
        "validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
    )
    assert refused.value.status == 422
    assert refused.value.body == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'EndpointSlice.discovery.k8s.io "web-abcde" is invalid: metadata.labels: Invalid value: '
        f'"meshfed.io/controller": {detail}',
        "reason": "Invalid",
        "details": {
            "name": "web-abcde",
            "group": "discovery.k8s.io",
            "kind": "EndpointSlice",
            "causes": [
                {
                    "reason": "FieldValueInvalid",
                    "message": f'Invalid value: "meshfed.io/controller": {detail}',
                    "field": "metadata.labels",
                }
            ],
        },
        "code": 422,
    }
    rfc1123 = (
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and "
        "end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
        "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
    )
    for name, detail in [
        ("Web_1", rfc1123),
        ("web.shop", "must not contain dots"),
        ("w" * 64, "must be no more than 63 characters"),
    ]:
        with pytest.raises(ApiError) as refused:
            cluster.create(service(name, shop))
        message = f'Service "{name}" is invalid: metadata.name: Invalid value: "{name}": {detail}'
        assert refused.value.body["message"] == message
        assert refused.value.body["details"]["causes"] == [
            {"reason": "FieldValueInvalid", "message": f'Invalid value: "{name}": {detail}', "field": "metadata.name"}
        ]
    # A leading digit is fine for kube-apiserver 1.37; meshfed's mirror names avoid it for older servers.
    assert cluster.create(service("9lives", shop))["metadata"]["name"] == "9lives"


def test_the_api_server_sets_defaults_and_keeps_them_on_update(cluster: Cluster) -> None:
    shop = cluster.namespace("shop")
    created = cluster.create(service("web", shop, ports={"http": 80}))
    spec, metadata = created["spec"], created["metadata"]
    assert ipaddress.ip_address(spec["clusterIP"]) in SERVICE_RANGE
    assert spec["clusterIPs"] == [spec["clusterIP"]]
    assert {
        key: spec[key] for key in ("type", "sessionAffinity", "ipFamilies", "ipFamilyPolicy", "internalTrafficPolicy")
    } == {
        "type": "ClusterIP",
        "sessionAffinity": "None",
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "internalTrafficPolicy": "Cluster",
    }
    assert spec["ports"] == [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 80}]
    assert created["status"] == {"loadBalancer": {}}
    assert uuid.UUID(metadata["uid"])
    assert metadata["resourceVersion"].isdigit()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", metadata["creationTimestamp"])

    # An update that leaves the allocated fields out keeps them (and without a resourceVersion is unconditional).
    replaced = cluster.replace(service("web", shop, ports={"http": 81}))
    assert replaced["spec"]["clusterIP"] == spec["clusterIP"]
    assert replaced["metadata"]["uid"] == metadata["uid"]
    assert replaced["metadata"]["resourceVersion"] != metadata["resourceVersion"]
    assert replaced["spec"]["ports"] == [{"name": "http", "protocol": "TCP", "port": 81, "targetPort": 81}]
    # One that changes nothing writes nothing.
    assert cluster.replace(replaced)["metadata"]["resourceVersion"] == replaced["metadata"]["resourceVersion"]
    stale = service("web", shop, ports={"http": 82})
    stale["metadata"]["resourceVersion"] = metadata["resourceVersion"]
    with pytest.raises(ApiError) as refused:
        cluster.replace(stale)
    assert refused.value.status == 409
    assert refused.value.body["message"] == (
        'Operation cannot be fulfilled on services "web": the object has been modified; please apply your changes '
        "to the latest version and try again"
    )
    moved = replaced | {"spec": replaced["spec"] | {"clusterIP": "10.96.0.99", "clusterIPs": ["10.96.0.99"]}}
    with pytest.raises(ApiError) as refused:
        cluster.replace(moved)
    assert refused.value.body["message"] == (
        'Service "web" is invalid: spec.clusterIPs[0]: Invalid value: ["10.96.0.99"]: may not change once set'
    )

    bare = endpoint_slice("web", [("10.244.0.7", True, "")], 8080, namespace=shop)
    del bare["endpoints"][0]["conditions"], bare["ports"][0]["protocol"]
    endpoints = cluster.create(bare)
    assert endpoints["metadata"]["generation"] == 1
    assert endpoints["endpoints"] == [{"addresses": ["10.244.0.7"], "conditions": {}}]
    assert endpoints["ports"] == [{"name": "http", "protocol": "TCP", "port": 8080}]
    with pytest.raises(ApiError) as refused:
        cluster.create(endpoint_slice("web", [("10.244.0.7", True, "")], 8080, namespace=shop))
    assert refused.value.status == 409
    assert refused.value.body["message"] == 'endpointslices.discovery.k8s.io "web-abcde" already exists'


# -- configuration and naming ----------------------------------------------------------------------------


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)


@given(st.tuples(_LABEL, _LABEL, _LABEL, _LABEL), st.tuples(_LABEL, _LABEL, _LABEL, _LABEL))
def test_mirror_names_are_dns_1035_labels_distinct_for_distinct_imports(
    one: tuple[str, str, str, str], other: tuple[str, str, str, str]
) -> None:
    def name(zone: str, service_name: str, namespace: str, peer: str) -> str:
        return mirror_name(zone, LocalImport(peer=peer, service=service_name, namespace=namespace, ports={}))

    first = name(*one)
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", first), first
    assert first == name(*one), "the same import always gets the same name"
    assert (first == name(*other)) == (one == other)


def test_zone_config_and_cli_select_the_kubernetes_catalog(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from meshfed.cli import app

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("{}")
    result = CliRunner().invoke(
        app,
        [
            "zone",
            "init",
            "--dir",
            str(tmp_path / "east"),
            "--name",
            "east",
            "--trust-domain",
            "east.mesh",
            "--catalog",
            "kubernetes",
            "--kubeconfig",
            str(kubeconfig),
            "--kube-namespace",
            "shop",
            "--kube-namespace",
            "default",
            "--mirror-namespace",
            "meshfed-imports",
        ],
    )
    assert result.exit_code == 0, result.output
    config = tomllib.loads((tmp_path / "east" / "zone.toml").read_text())
    assert config["catalog"] == "kubernetes"
    assert config["kubernetes"] == {
        "namespaces": ["default", "shop"],
        "kubeconfig": str(kubeconfig),
        "mirror_namespace": "meshfed-imports",
    }
    catalog = open_catalog(Zone.open(tmp_path / "east"))
    assert isinstance(catalog, KubernetesCatalog)
    run(catalog.aclose)
    bad = CliRunner().invoke(
        app,
        [
            "zone",
            "init",
            "--dir",
            str(tmp_path / "west"),
            "--name",
            "west",
            "--trust-domain",
            "west.mesh",
            "--catalog",
            "kubernetes",
            "--kube-namespace",
            "Not_A_Label",
        ],
    )
    assert bad.exit_code != 0
    assert "must be a DNS label" in str(bad.exception)
