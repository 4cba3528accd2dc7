"""The chart installed into the real kube-apiserver, under PodSecurity ``restricted``, for every values file.

``tests/test_helm.py`` checks rendered manifests against schemas; this checks
what the real API server does with them: every object admitted on
``helm install`` and ``helm upgrade``, and every pod the Deployment's
ReplicaSet makes admitted by PodSecurity admission in ``restricted`` mode.
There is no kubelet, so pods stay Pending: admission is what is tested.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import RealKubernetes, real_kubernetes
from tests.test_helm import CASES, CHART, IMAGE

# What prometheus-operator installs, reduced to what the API server needs to admit a ServiceMonitor.
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "names": {"kind": "ServiceMonitor", "listKind": "ServiceMonitorList", "plural": "servicemonitors"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }
        ],
    },
}
# Namespaces the example values name outside the release's own (kubernetes.yaml watches and mirrors there).
OTHER_NAMESPACES = ("shop", "meshfed-imports")


def kubectl(kube: RealKubernetes, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [kube.kubectl, "--kubeconfig", kube.admin_kubeconfig, *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def helm(kube: RealKubernetes, *args: str) -> subprocess.CompletedProcess[str]:
    image = IMAGE if args[0] in ("install", "upgrade") else ()
    return subprocess.run(
        [kube.helm, "--kubeconfig", kube.admin_kubeconfig, *args, *image],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def apply(kube: RealKubernetes, document: dict[str, Any]) -> None:
    result = kubectl(kube, "apply", "-f", "-", stdin=json.dumps(document))
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def kube() -> RealKubernetes:
    kube = real_kubernetes()
    apply(kube, SERVICE_MONITOR_CRD)
    for name in OTHER_NAMESPACES:
        apply(kube, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    # The API server's own condition, watched by kubectl: no polling here.
    crd = "crd/servicemonitors.monitoring.coreos.com"
    established = kubectl(kube, "wait", "--for=condition=Established", crd, "--timeout=30s")
    assert established.returncode == 0, established.stderr
    return kube


@pytest.fixture
def restricted_namespace(kube: RealKubernetes) -> Iterator[str]:
    name = f"meshfed-helm-{uuid.uuid4().hex[:8]}"
    labels = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")}
    apply(kube, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
    yield name
    kubectl(kube, "delete", "namespace", name, "--wait=false")


def pods_of(kube: RealKubernetes, namespace: str) -> list[dict[str, Any]]:
    result = kubectl(kube, "get", "pods", "-n", namespace, "-o", "json")
    assert result.returncode == 0, result.stderr
    items: list[dict[str, Any]] = json.loads(result.stdout)["items"]
    return items


def replica_set_failures(kube: RealKubernetes, namespace: str) -> list[str]:
    """Why ReplicaSets could not create pods (PodSecurity refusals land here)."""
    result = kubectl(kube, "get", "events", "-n", namespace, "-o", "json")
    events = json.loads(result.stdout)["items"] if result.returncode == 0 else []
    return [event["message"] for event in events if event.get("reason") == "FailedCreate"]


def deployments(kube: RealKubernetes, namespace: str) -> list[str]:
    result = kubectl(kube, "get", "deployments", "-n", namespace, "-o", "jsonpath={.items[*].metadata.name}")
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.parametrize("values", CASES)
def test_chart_installs_and_upgrades_under_podsecurity_restricted(kube, restricted_namespace, values, tmp_path: Path):
    namespace = restricted_namespace
    release = "zone"
    installed = helm(kube, "install", release, str(CHART), "-n", namespace, *values)
    assert installed.returncode == 0, installed.stderr
    assert "violate PodSecurity" not in installed.stderr, installed.stderr

    names = deployments(kube, namespace)
    assert names, "the chart made no Deployment"
    deadline = time.monotonic() + 60
    while len(pods_of(kube, namespace)) < len(names):
        failures = replica_set_failures(kube, namespace)
        assert not failures, f"pods were refused: {failures}"
        assert time.monotonic() < deadline, "the ReplicaSets made no pods"
        time.sleep(0.2)
    for pod in pods_of(kube, namespace):
        # Admitted by PodSecurity `restricted`; Pending only because this control plane has no kubelet.
        assert pod["status"]["phase"] == "Pending"
        assert pod["spec"]["serviceAccountName"].startswith(release)

    upgraded = helm(
        kube, "upgrade", release, str(CHART), "-n", namespace, *values, "--set-string", "podAnnotations.upgrade=two"
    )
    assert upgraded.returncode == 0, upgraded.stderr
    assert "violate PodSecurity" not in upgraded.stderr, upgraded.stderr
    history = helm(kube, "history", release, "-n", namespace, "-o", "json")
    assert [entry["status"] for entry in json.loads(history.stdout)] == ["superseded", "deployed"]
    deadline = time.monotonic() + 60
    while not any(
        (pod["metadata"].get("annotations") or {}).get("upgrade") == "two" for pod in pods_of(kube, namespace)
    ):
        failures = replica_set_failures(kube, namespace)
        assert not failures, f"pods were refused after the upgrade: {failures}"
        assert time.monotonic() < deadline, "the upgrade made no new pod"
        time.sleep(0.2)
    uninstalled = helm(kube, "uninstall", release, "-n", namespace, "--wait")
    assert uninstalled.returncode == 0, uninstalled.stderr
