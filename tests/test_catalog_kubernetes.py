"""The Kubernetes catalog source, through kubernetes_asyncio, against the API server double (and a real cluster if set).

Run against a real cluster (kind, minikube, ...): ``KUBECONFIG=~/.kube/config pytest tests/test_catalog_kubernetes.py
-k real``; it works in a throwaway namespace ``meshfed-test-<random>`` that it creates and deletes.
"""

from __future__ import annotations

import asyncio
import os
import time
import tomllib
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from meshfed.catalog import KubernetesSettings, LocalImport, open_catalog
from meshfed.catalog.kubernetes import MIRROR_LABEL, OWNER_LABEL, KubernetesCatalog
from meshfed.errors import CatalogError
from meshfed.zone import Zone
from tests.conftest import eventually, until
from tests.doubles.kubernetes import KubernetesDouble, endpoint_slice, service

FAST = {"watch_timeout": 5, "initial_sync_timeout": 5.0, "backoff": (0.01, 0.05)}


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[tuple[KubernetesDouble, Path]]:
    with KubernetesDouble() as double:
        yield double, double.write_kubeconfig(tmp_path / "kubeconfig")


def source(kubeconfig: Path, **settings: Any) -> KubernetesCatalog:
    return KubernetesCatalog(
        KubernetesSettings(kubeconfig=str(kubeconfig), **settings),
        zone="east",
        **FAST,  # type: ignore[arg-type]
    )


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def test_lists_services_with_ready_endpoints_ports_and_zones(kube):
    double, kubeconfig = kube
    double.apply(service("web", ports={"http": 80, "metrics": 9100}, labels={"app": "web"}))
    double.apply(
        endpoint_slice("web", [("10.0.0.7", True, "eu-1a"), ("10.0.0.8", False, ""), ("10.0.0.9", None, "")], 8080)
    )
    double.apply(service("other", namespace="elsewhere"))  # not a watched namespace
    double.apply(service("db", namespace="data", ports={"sql": 5432}))
    external = service("legacy")
    external["spec"] = {"type": "ExternalName", "externalName": "legacy.example.com"}
    double.apply(external)

    async def scenario() -> None:
        catalog = source(kubeconfig, namespaces=["default", "data"])
        try:
            snapshot = await catalog.snapshot()
        finally:
            await catalog.aclose()
        assert [s.key for s in snapshot.services] == [("data", "db"), ("default", "web")]
        web = snapshot.service("default", "web")
        assert web is not None
        assert web.ports == {"http": 80, "metrics": 9100}
        assert web.labels == {"app": "web"}
        assert [(e.address, e.port, e.healthy, e.locality.zone) for e in web.endpoints] == [
            ("10.0.0.7", 8080, True, "eu-1a"),
            ("10.0.0.8", 8080, False, ""),
            ("10.0.0.9", 8080, True, ""),  # ready unset reads as ready, as the API documents
        ]

    run(scenario)


def test_watch_follows_changes_and_relists_after_410_gone(kube):
    double, kubeconfig = kube
    double.apply(service("web"))

    async def scenario() -> None:
        catalog = source(kubeconfig)
        try:
            first = await catalog.snapshot()
            assert (await catalog.watch(first.version, 0.3)).version == first.version
            started = time.monotonic()
            double.apply(endpoint_slice("web", [("10.0.0.7", True, "")], 8080))
            changed = await catalog.watch(first.version, 5.0)
            assert time.monotonic() - started < 2.0, "the watch stream should deliver the change at once"
            assert [e.address for e in changed.services[0].endpoints] == ["10.0.0.7"]

            # History compacted while changes happen: the watch gets 410 Gone and the source lists again.
            double.compact()
            double.apply(service("api", ports={"grpc": 9090}))
            double.delete("endpointslices", "default", "web-abcde")
            after = await until(
                catalog, lambda s: s.service("default", "api") is not None and not s.services[-1].endpoints
            )
            assert after.version > changed.version
            assert catalog.last_error is None
        finally:
            await catalog.aclose()
        watches = [query for method, path, query in double.requests if query.get("watch")]
        assert all(query.get("allowWatchBookmarks") for query in watches)
        relists = [path for method, path, query in double.requests if not query.get("watch") and method == "GET"]
        assert len(relists) >= 4, "each kind is listed once at start and again after 410"

    run(scenario)


def test_publish_imports_mirrors_services_and_removes_stale_ones(kube):
    double, kubeconfig = kube
    double.apply(service("web"))
    # Someone else's Service and a mirror owned by another zone: never touched.
    double.apply(service("keep-me"))
    other = service("api-north", labels={MIRROR_LABEL: "true", OWNER_LABEL: "west"})
    double.apply(other)
    imports = [
        LocalImport(peer="west", service="api", namespace="default", ports={"http": ("127.0.0.1", 15001)}),
        LocalImport(
            peer="north",
            service="db",
            namespace="data",
            ports={"sql": ("127.0.0.1", 15002), "admin": ("127.0.0.1", 15003)},
        ),
    ]

    async def scenario() -> None:
        catalog = source(kubeconfig)
        try:
            await catalog.snapshot()
            await catalog.publish_imports(imports)
            mirrors = double.objects("services", selector=f"{OWNER_LABEL}=east")
            assert [(m["metadata"]["namespace"], m["metadata"]["name"]) for m in mirrors] == [
                ("data", "db-north"),
                ("default", "api-west"),
            ]
            api = mirrors[1]
            assert api["spec"]["ports"] == [{"name": "http", "port": 15001, "targetPort": 15001, "protocol": "TCP"}]
            assert "selector" not in api["spec"]
            (api_slice,) = double.objects("endpointslices", "default", "kubernetes.io/service-name=api-west")
            assert api_slice["endpoints"] == [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]
            assert api_slice["metadata"]["labels"][MIRROR_LABEL] == "true"
            # Mirrors are not this zone's services.
            await asyncio.sleep(0.3)
            assert [s.name for s in (await catalog.watch(0, 0.1)).services] == ["keep-me", "web"]

            writes = len([r for r in double.requests if r[0] in ("POST", "PUT", "DELETE")])
            await catalog.publish_imports(imports)  # unchanged: nothing rewritten
            assert len([r for r in double.requests if r[0] in ("POST", "PUT", "DELETE")]) == writes

            moved = [imports[0].model_copy(update={"ports": {"http": ("127.0.0.1", 15009)}})]
            await catalog.publish_imports(moved)
            (api,) = double.objects("services", selector=f"{OWNER_LABEL}=east")
            assert api["spec"]["ports"][0]["port"] == 15009
            assert [
                s["metadata"]["name"] for s in double.objects("endpointslices", selector=f"{OWNER_LABEL}=east")
            ] == ["api-west"]
            await catalog.publish_imports([])
            assert double.objects("services", selector=f"{OWNER_LABEL}=east") == []
            assert double.objects("endpointslices", selector=f"{OWNER_LABEL}=east") == []
            names = [s["metadata"]["name"] for s in double.objects("services")]
            assert names == ["api-north", "keep-me", "web"]
        finally:
            await catalog.aclose()

    run(scenario)


def test_mirror_namespace_setting_puts_every_mirror_there(kube):
    double, kubeconfig = kube

    async def scenario() -> None:
        catalog = source(kubeconfig, mirror_namespace="meshfed-imports")
        try:
            await catalog.snapshot()
            await catalog.publish_imports(
                [LocalImport(peer="west", service="api", namespace="shop", ports={"http": ("127.0.0.1", 15001)})]
            )
        finally:
            await catalog.aclose()
        assert [(m["metadata"]["namespace"], m["metadata"]["name"]) for m in double.objects("services")] == [
            ("meshfed-imports", "api-west")
        ]

    run(scenario)


def test_bad_responses_keep_the_last_good_snapshot_and_say_what_happened(kube):
    double, kubeconfig = kube
    double.apply(service("web"))

    async def scenario() -> None:
        catalog = source(kubeconfig)
        try:
            good = await catalog.snapshot()
            double.compact()  # the next watch fails over to a list, which now fails
            double.fail_next(3, 500)
            double.apply(service("api"))
            await eventually(lambda: any("injected by the test" in error for error in catalog.recent_errors))
            double.compact()
            double.fail_next(2, 200, body="<html>not an API server</html>")
            double.apply(service("db"))
            await eventually(lambda: any("not JSON" in error for error in catalog.recent_errors))
            assert all(error.startswith(f"the Kubernetes API at {double.url}") for error in catalog.recent_errors)
            assert (await catalog.watch(0, 0.1)).service("default", "web") is not None
            recovered = await until(catalog, lambda s: [x.name for x in s.services] == ["api", "db", "web"])
            assert recovered.version > good.version
        finally:
            await catalog.aclose()

    run(scenario)


def test_unauthorized_and_missing_credentials_say_what_to_check(kube, tmp_path):
    double, kubeconfig = kube
    double.token = "rotated"

    async def unauthorized() -> None:
        catalog = KubernetesCatalog(
            KubernetesSettings(kubeconfig=str(kubeconfig)), zone="east", initial_sync_timeout=0.5, backoff=(0.01, 0.05)
        )
        try:
            with pytest.raises(CatalogError, match=r"refused access.*401.*RBAC"):
                await catalog.snapshot()
        finally:
            await catalog.aclose()

    run(unauthorized)

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


def test_zone_config_and_cli_select_the_kubernetes_catalog(tmp_path, kube):
    from typer.testing import CliRunner

    from meshfed.cli import app

    _, kubeconfig = kube
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


@pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="needs a real cluster: set KUBECONFIG")
def test_real_cluster_lists_watches_and_mirrors():
    from kubernetes_asyncio import client, config

    namespace = f"meshfed-test-{uuid.uuid4().hex[:8]}"
    kubeconfig = os.environ["KUBECONFIG"].split(os.pathsep)[0]

    async def scenario() -> None:
        api = await config.new_client_from_config(config_file=kubeconfig)
        core = client.CoreV1Api(api)
        await core.create_namespace(cast(Any, {"metadata": {"name": namespace}}))
        catalog = KubernetesCatalog(
            KubernetesSettings(kubeconfig=kubeconfig, namespaces=[namespace]),
            zone="realtest",
            **FAST,  # type: ignore[arg-type]
        )
        try:
            first = await catalog.snapshot()
            await core.create_namespaced_service(namespace, cast(Any, service("web", namespace=namespace)))
            seen = await until(catalog, lambda s: s.service(namespace, "web") is not None, timeout=20)
            assert seen.version > first.version
            await catalog.publish_imports(
                [LocalImport(peer="west", service="api", namespace=namespace, ports={"http": ("10.1.2.3", 15001)})]
            )
            mirror = await core.read_namespaced_service("api-west", namespace)
            assert mirror.metadata.labels[MIRROR_LABEL] == "true"
            await catalog.publish_imports([])
            services = await core.list_namespaced_service(namespace, label_selector=f"{MIRROR_LABEL}=true")
            assert services.items == []
        finally:
            await catalog.aclose()
            await core.delete_namespace(namespace)
            await api.close()

    run(scenario)
