"""The Helm chart: lint, render, and validate against the Kubernetes schemas, for every values file.

helm is built from the Go module proxy into ``.venv/bin`` by ``make`` (``$(BIN)/helm``); a
missing helm fails these tests rather than skipping them. The rendered manifests are checked
offline with the ``kubernetes-validate`` schemas (strict: unknown fields are errors), and the
zone config the chart writes is parsed by meshfed's own ``ZoneConfig``, so the chart and the
Python model cannot drift apart silently.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import typer
import yaml

from meshfed.cli import app
from meshfed.replica.gateway_feed import MAX_PARTS
from meshfed.zone import Zone, ZoneConfig

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "meshfed"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
# A highly available zone whose gateway runs as its own Deployment (gateway.deployment.enabled).
GATEWAY_REPLICAS = CHART / "examples" / "gateway-replicas.yaml"
# A version kubernetes-validate ships schemas for; also what helm renders Capabilities against.
KUBE_VERSION = "1.33.0"
NAMESPACE = "meshfed-system"
RBAC_KINDS = {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}

Manifest = dict[str, Any]

# Default values plus every example values file: each must lint, render and validate.
CASES = [pytest.param([], id="defaults")] + [pytest.param(["-f", str(path)], id=path.stem) for path in EXAMPLES]


@pytest.fixture(scope="session")
def helm() -> str:
    for candidate in (REPO / ".venv" / "bin" / "helm", shutil.which("helm")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail(
        "helm is not installed; run 'make .venv/bin/helm' "
        "(GOBIN=.venv/bin go install helm.sh/helm/v3/cmd/helm@<version>)"
    )


# Every install names the image it runs (the chart has no default: no image is published), so every
# render here does too.
IMAGE = ("--set", "image.repository=registry.example/meshfed")


def run_helm(helm: str, *args: str, image: bool = True) -> subprocess.CompletedProcess[str]:
    command = [helm, *args, *(IMAGE if image and args[0] in ("template", "lint") else ())]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)


def render(helm: str, values: list[str]) -> list[Manifest]:
    result = run_helm(
        helm, "template", "east", str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION, *values
    )
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [manifest for manifest in manifests if manifest["kind"] == kind]


def one(manifests: list[Manifest], kind: str, name_suffix: str = "") -> Manifest:
    found = [m for m in of_kind(manifests, kind) if m["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, found {len(found)}"
    return found[0]


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    for manifest in manifests:
        if manifest["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield manifest["metadata"]["name"], manifest["spec"]["template"]["spec"]


def of_component(manifests: list[Manifest], kind: str, component: str) -> list[Manifest]:
    return [
        m for m in of_kind(manifests, kind) if m["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]


def controller_deployment(manifests: list[Manifest]) -> Manifest:
    """The zone's controller (`meshfed up`), beside which a gateway Deployment may run."""
    (deployment,) = of_component(manifests, "Deployment", "controller")
    return deployment


def gateway_deployment(manifests: list[Manifest]) -> Manifest | None:
    """The gateway's own Deployment (`meshfed gateway`), if gateway.deployment.enabled."""
    found = of_component(manifests, "Deployment", "gateway")
    assert len(found) <= 1
    return found[0] if found else None


def pod_labels_of(deployment: Manifest) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def catalog_mode(manifests: list[Manifest]) -> str:
    config = tomllib.loads(one(manifests, "ConfigMap")["data"]["zone.toml"])
    return str(config["catalog"])


@pytest.mark.parametrize("values", CASES)
def test_helm_lint_is_clean(helm: str, values: list[str]) -> None:
    result = run_helm(helm, "lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION, *values)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", CASES)
def test_rendered_manifests_match_kubernetes_schemas(helm: str, values: list[str]) -> None:
    manifests = render(helm, values)
    assert manifests
    for manifest in manifests:
        if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
            # A CRD: no schema ships with Kubernetes; check it scrapes the metrics Service's port.
            metrics = one(manifests, "Service", "-metrics")
            assert manifest["spec"]["endpoints"][0]["port"] in {port["name"] for port in metrics["spec"]["ports"]}
            assert manifest["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
            continue
        try:
            kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{manifest['kind']} {manifest['metadata']['name']}: {err.message}")


@pytest.mark.parametrize("values", CASES)
def test_every_pod_is_hardened(helm: str, values: list[str]) -> None:
    specs = list(pod_specs(render(helm, values)))
    assert specs
    for name, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        tmp_volumes = {volume["name"] for volume in spec["volumes"] if "emptyDir" in volume}
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert container["resources"]["requests"], where
            assert container["resources"]["limits"], where
            # A read-only root needs a writable /tmp.
            tmp = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/tmp"]
            assert len(tmp) == 1, where
            assert tmp[0]["name"] in tmp_volumes, where


@pytest.mark.parametrize("values", CASES)
def test_controller_probes_and_services(helm: str, values: list[str]) -> None:
    manifests = render(helm, values)
    (controller,) = controller_deployment(manifests)["spec"]["template"]["spec"]["containers"]
    # The metrics listener: plain HTTP on the pod IP whether the API is on loopback or behind TLS.
    assert controller["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert controller["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert controller["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    ports = {port["name"]: port["containerPort"] for port in controller["ports"]}
    assert f"--metrics-address=0.0.0.0:{ports['metrics']}" in controller["args"]
    gateway = one(manifests, "Service", "-gateway")
    assert [port["port"] for port in gateway["spec"]["ports"]] == [15443]
    pod_labels = pod_labels_of(controller_deployment(manifests))
    if highly_available(manifests):
        pod_labels["meshfed.io/leader"] = "true"  # what the leading pod labels itself (meshfed up --leader-pod)
    gateways = gateway_deployment(manifests)
    for service in of_kind(manifests, "Service"):
        serving = pod_labels
        if gateways is not None and service is gateway:
            serving = pod_labels_of(gateways)  # the gateway's own pods, not the leader
        assert selects(service["spec"]["selector"], serving), service["metadata"]["name"]
    peering = {port["name"]: port["port"] for port in one(manifests, "Service", "-peering")["spec"]["ports"]}
    assert peering["grpc-peering"] == 15440
    assert peering["tls-establish"] == 15441


def test_gateway_service_type_defaults_to_load_balancer_and_is_configurable(helm: str) -> None:
    assert one(render(helm, []), "Service", "-gateway")["spec"]["type"] == "LoadBalancer"
    changed = render(helm, ["--set", "gateway.service.type=ClusterIP"])
    assert one(changed, "Service", "-gateway")["spec"]["type"] == "ClusterIP"


def highly_available(manifests: list[Manifest]) -> bool:
    return bool(controller_deployment(manifests)["spec"]["replicas"] > 1)


# A highly available zone's pods campaign for their Lease and the leader keeps the zone in Secrets
# (tests/test_replica.py runs the state replica as this account against the real kube-apiserver).
LEADER_RULES = [
    (["coordination.k8s.io"], ["leases"], ["get", "create", "update"]),
    ([""], ["secrets"], ["get", "list", "create", "update", "delete"]),
    ([""], ["pods"], ["patch"]),
]


def assert_gateway_rbac(manifests: list[Manifest]) -> None:
    """The gateway pods' account may get the Secret the leader publishes their config in, and nothing else."""
    deployment = gateway_deployment(manifests)
    assert deployment is not None
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert account != controller_deployment(manifests)["spec"]["template"]["spec"]["serviceAccountName"]
    (role,) = of_component(manifests, "Role", "gateway")
    assert role["metadata"]["namespace"] == NAMESPACE
    # Not the state Secrets (they hold the CA key): only the feed, by name (meshfed up --gateway-feed), the
    # first object and each further part a config may take.
    feed = "east-meshfed-state-gateway"
    names = [feed, *(f"{feed}-{part}" for part in range(1, MAX_PARTS))]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": names, "verbs": ["get"]}]
    (binding,) = of_component(manifests, "RoleBinding", "gateway")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    # No other binding names the gateway's account.
    for other in of_kind(manifests, "RoleBinding") + of_kind(manifests, "ClusterRoleBinding"):
        if other is not binding:
            assert account not in {subject["name"] for subject in other["subjects"]}, other["metadata"]["name"]


@pytest.mark.parametrize("values", CASES)
def test_rbac_exists_only_in_kubernetes_mode_or_for_high_availability(helm: str, values: list[str]) -> None:
    manifests = render(helm, values)
    leader = [m for m in manifests if m["kind"] in RBAC_KINDS and m["metadata"]["name"].endswith("-leader")]
    if highly_available(manifests):
        role = one(leader, "Role")
        assert role["metadata"]["namespace"] == NAMESPACE
        assert [(rule["apiGroups"], rule["resources"], rule["verbs"]) for rule in role["rules"]] == LEADER_RULES
        assert one(leader, "RoleBinding")["roleRef"]["name"] == role["metadata"]["name"]
    else:
        assert leader == []
    manifests = [m for m in manifests if m not in leader]
    gateway = of_component(manifests, "Role", "gateway") + of_component(manifests, "RoleBinding", "gateway")
    if gateway_deployment(manifests) is not None:
        assert_gateway_rbac(manifests)
    else:
        assert gateway == []
    manifests = [m for m in manifests if m not in gateway]
    rbac = [manifest for manifest in manifests if manifest["kind"] in RBAC_KINDS]
    automount = controller_deployment(manifests)["spec"]["template"]["spec"]["automountServiceAccountToken"]
    if catalog_mode(manifests) != "kubernetes":
        assert rbac == []
        assert automount is highly_available(manifests)
        return
    assert automount is True
    # Exactly the verbs the source uses (tests/test_catalog_kubernetes.py checks each is used), and
    # nothing cluster-wide: stale mirrors are looked for in the mirror namespace only.
    assert of_kind(manifests, "ClusterRole") == of_kind(manifests, "ClusterRoleBinding") == []
    verbs = {"-read": ["list", "watch"], "-mirror": ["get", "list", "create", "update", "delete"]}
    for role in of_kind(manifests, "Role"):
        name = role["metadata"]["name"]
        (expected,) = [wanted for suffix, wanted in verbs.items() if name.endswith(suffix)]
        assert [(rule["apiGroups"], rule["resources"], rule["verbs"]) for rule in role["rules"]] == [
            ([""], ["services"], expected),
            (["discovery.k8s.io"], ["endpointslices"], expected),
        ], name
    config = tomllib.loads(one(manifests, "ConfigMap")["data"]["zone.toml"])
    writers = [role for role in of_kind(manifests, "Role") if "create" in role["rules"][0]["verbs"]]
    # Writes only where mirrors go; reads in every watched namespace.
    assert [role["metadata"]["namespace"] for role in writers] == [config["kubernetes"]["mirror_namespace"]]
    readers = {role["metadata"]["namespace"] for role in of_kind(manifests, "Role") if role not in writers}
    assert readers == set(config["kubernetes"]["namespaces"])


def test_kubernetes_mode_with_default_values_grants_rbac(helm: str) -> None:
    manifests = render(helm, ["--set", "catalog.mode=kubernetes"])
    assert {manifest["kind"] for manifest in manifests} & RBAC_KINDS == {"Role", "RoleBinding"}
    assert one(manifests, "Role", "-mirror")["metadata"]["namespace"] == NAMESPACE
    without = render(helm, ["--set", "catalog.mode=kubernetes", "--set", "rbac.create=false"])
    assert not [m for m in without if m["kind"] in RBAC_KINDS]


@pytest.mark.parametrize(
    "bad",
    [
        "catalog.mode=etcd",
        "gateway.port=70000",
        "zone.name=East_1",
        "gateway.service.type=ExternalName",
        "zone.failingPeer.policy=sometimes",
        "zone.failover.split.east=0",
        "zone.failover.order={East}",
        "zone.healthCheckInterval=often",
        "typo=1",
        "persistence.sizee=1Gi",
        "highAvailability.replicas=1",
        "highAvailability.leaseDuration=soon",
        "gateway.deployment.replicas=0",
        "gateway.deployment.enable=true",
        "gateway.deployment.podDisruptionBudget.maxUnavailable=0",
        "gateway.deployment.serviceAccount.name=Gateway",
        "api.tls.secretName=Not_A_Name",
        "metrics.port=0",
        "networkPolicy.enable=true",
        "networkPolicy.egressListeners.ports=0",
        "egress.workloadTls=sometimes",
        "egress.imports[0].service=cart",
        "authz[0].service=cart,authz[0].action=maybe,authz[0].id=*",
        "authz[0].service=cart,authz[0].action=allow,authz[0].id=west.mesh/*",
        "authz[0].service=cart,authz[0].action=allow",
    ],
)
def test_values_schema_rejects_bad_values(helm: str, bad: str) -> None:
    result = run_helm(helm, "template", "east", str(CHART), "--kube-version", KUBE_VERSION, "--set", bad)
    assert result.returncode != 0
    assert "schema" in result.stderr, result.stderr


def test_an_install_that_names_no_image_says_which_to_build_and_push(helm: str) -> None:
    result = run_helm(helm, "template", "east", str(CHART), "--kube-version", KUBE_VERSION, image=False)
    assert result.returncode != 0
    assert "set image.repository" in result.stderr, result.stderr
    assert "gateways/Dockerfile" in result.stderr, result.stderr
    image = one(render(helm, ["--set", "image.tag=v9"]), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert image["image"] == "registry.example/meshfed:v9"


@pytest.mark.parametrize("values", CASES)
def test_zone_toml_is_a_valid_zone_config(helm: str, values: list[str]) -> None:
    manifests = render(helm, values)
    config = ZoneConfig.model_validate(tomllib.loads(one(manifests, "ConfigMap")["data"]["zone.toml"]))
    assert config.gateway_address == "0.0.0.0:15443"
    if config.catalog == "consul":
        assert config.consul is not None
        # The ACL token is mounted as a file at the path the config names.
        (controller,) = controller_deployment(manifests)["spec"]["template"]["spec"]["containers"]
        mounts = [mount["mountPath"] for mount in controller["volumeMounts"]]
        assert config.consul.token_file is not None
        assert str(Path(config.consul.token_file).parent) in mounts


def assert_options_of_meshfed(container: Manifest, name: str) -> None:
    """Every argument of ``container`` is an option of ``meshfed <name>``, and they parse (ports, choices)."""
    command, *args = container["args"]
    assert command == name
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    subcommand = group.get_command(group.make_context("meshfed", [name, "--help"], resilient_parsing=True), name)
    assert subcommand is not None
    options = {option for param in subcommand.params for option in (*param.opts, *param.secondary_opts)}
    for arg in args:
        assert arg.split("=", 1)[0] in options, arg
    assert subcommand.make_context(name, args)


@pytest.mark.parametrize("values", CASES)
def test_controller_args_are_options_of_meshfed_up(helm: str, values: list[str]) -> None:
    (controller,) = controller_deployment(render(helm, values))["spec"]["template"]["spec"]["containers"]
    assert_options_of_meshfed(controller, "up")


@pytest.mark.parametrize("values", CASES)
def test_gateway_args_are_options_of_meshfed_gateway(helm: str, values: list[str]) -> None:
    # Every values file with the gateway apart as well (connect-egress adds a listener, consul a catalog...);
    # mirrors then live with the gateway pods, in the release namespace.
    manifests = render(helm, [*values, "-f", str(GATEWAY_REPLICAS), "--set", "catalog.kubernetes.mirrorNamespace="])
    deployment = gateway_deployment(manifests)
    assert deployment is not None
    (gateway,) = deployment["spec"]["template"]["spec"]["containers"]
    assert_options_of_meshfed(gateway, "gateway")
    (controller,) = controller_deployment(manifests)["spec"]["template"]["spec"]["containers"]
    assert_options_of_meshfed(controller, "up")
    assert "--gateway-feed" in controller["args"]
    # The replicas read what the leader publishes: the same --state-secret.
    assert _arg(gateway, "--state-secret") == _arg(controller, "--state-secret") == f"{NAMESPACE}/east-meshfed-state"
    assert _arg(gateway, "--metrics-address") == _arg(controller, "--metrics-address")


def _bootstrap_script(manifests: list[Manifest], root: Path) -> str:
    """The init container's script with its absolute paths moved under ``root``."""
    script = str(one(manifests, "ConfigMap")["data"]["bootstrap.sh"])
    return script.replace("/var/lib/meshfed", str(root / "data")).replace("/etc/meshfed", str(root / "etc"))


def _prepare(manifests: list[Manifest], root: Path) -> dict[str, str]:
    (root / "data").mkdir()
    (root / "data" / "lost+found").mkdir()  # what a fresh ext4 volume holds
    (root / "etc" / "config").mkdir(parents=True)
    (root / "etc" / "admin-token").mkdir()
    (root / "etc" / "read-token").mkdir()
    (root / "etc" / "config" / "zone.toml").write_text(one(manifests, "ConfigMap")["data"]["zone.toml"])
    (root / "etc" / "admin-token" / "token").write_text("from-the-secret\n")
    (root / "etc" / "read-token" / "token").write_text("read-from-the-secret\n")
    return {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}


def test_bootstrap_creates_the_zone_then_keeps_it(helm: str, tmp_path: Path) -> None:
    manifests = render(helm, ["--set", "catalog.mode=kubernetes"])
    env = _prepare(manifests, tmp_path)
    script = _bootstrap_script(manifests, tmp_path)
    subprocess.run(["/bin/sh", "-c", script], check=True, env=env, timeout=60)
    zone = Zone.open(tmp_path / "data" / "zone")
    assert (zone.name, str(zone.trust_domain), zone.config.catalog) == ("east", "east.mesh", "kubernetes")
    assert zone.admin_token() == "from-the-secret"
    assert zone.read_token() == "read-from-the-secret"
    assert oct((zone.directory / "read-token").stat().st_mode & 0o777) == "0o600"
    root = zone.trust.own_bundle().roots
    # A restart keeps the CA and state; only zone.toml and the tokens are refreshed.
    (tmp_path / "etc" / "admin-token" / "token").write_text("rotated\n")
    (tmp_path / "etc" / "read-token" / "token").write_text("read-rotated\n")
    subprocess.run(["/bin/sh", "-c", script], check=True, env=env, timeout=60)
    again = Zone.open(tmp_path / "data" / "zone")
    assert again.trust.own_bundle().roots == root
    assert again.admin_token() == "rotated"
    assert again.read_token() == "read-rotated"


def test_bootstrap_seeds_the_zone_from_a_secret(helm: str, tmp_path: Path) -> None:
    made = Zone.init(tmp_path / "made", "east", "east.mesh")
    manifests = render(helm, ["--set", "zone.existingSecret=east-seed"])
    env = _prepare(manifests, tmp_path)
    seed = tmp_path / "etc" / "seed"
    seed.mkdir()
    # What `kubectl create secret generic --from-file=made/ --from-file=made/ca/` would mount.
    for path in [*(made.directory / "ca").glob("*.*"), made.directory / "state.db"]:
        if path.is_file():
            shutil.copy(path, seed / path.name)
    subprocess.run(["/bin/sh", "-c", _bootstrap_script(manifests, tmp_path)], check=True, env=env, timeout=60)
    zone = Zone.open(tmp_path / "data" / "zone")
    assert zone.trust.own_bundle().roots == made.trust.own_bundle().roots
    assert zone.authority.signing_ca().root == made.authority.signing_ca().root
    assert oct((zone.directory / "ca" / "root.key").stat().st_mode & 0o777) == "0o600"


def _controller(manifests: list[Manifest]) -> Manifest:
    (controller,) = controller_deployment(manifests)["spec"]["template"]["spec"]["containers"]
    return dict(controller)


def _arg(controller: Manifest, flag: str) -> str | None:
    values = [arg.split("=", 1)[1] for arg in controller["args"] if arg.startswith(f"{flag}=")]
    assert len(values) <= 1, values
    return values[0] if values else None


def test_a_highly_available_zone_keeps_its_state_in_secrets_and_elects_a_leader(helm: str) -> None:
    manifests = render(helm, ["--set", "highAvailability.enabled=true"])
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    controller = _controller(manifests)
    name = deployment["metadata"]["name"]
    assert _arg(controller, "--leader-lease") == f"{NAMESPACE}/{name}"
    assert _arg(controller, "--leader-identity") == "$(POD_NAME)"
    assert _arg(controller, "--state-secret") == f"{NAMESPACE}/{name}-state"
    # Every pod is Ready (a follower too, so the Deployment is Available); Services select the leader.
    assert _arg(controller, "--leader-pod") == f"{NAMESPACE}/$(POD_NAME)"
    for service in of_kind(manifests, "Service"):
        assert service["spec"]["selector"]["meshfed.io/leader"] == "true", service["metadata"]["name"]
    assert "meshfed.io/leader" not in deployment["spec"]["selector"]["matchLabels"]
    # Upgrades roll with surge: a new follower is Ready before an old pod (and its leadership) goes.
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in controller["env"]
    # A restored replica holds the tokens an older pod published; the chart's Secrets win over them.
    mounts = {mount["name"]: mount["mountPath"] for mount in controller["volumeMounts"]}
    assert _arg(controller, "--admin-token-file") == f"{mounts['admin-token']}/token"
    assert _arg(controller, "--read-token-file") == f"{mounts['read-token']}/token"
    # No volume: a pod lost with its disk loses nothing, and any node can run any pod.
    assert of_kind(manifests, "PersistentVolumeClaim") == []
    (data,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"]
    assert data == {"name": "data", "emptyDir": {}}
    single = render(helm, [])
    assert one(single, "Deployment")["spec"]["replicas"] == 1
    assert one(single, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}  # the volume has one writer
    assert all("meshfed.io/leader" not in service["spec"]["selector"] for service in of_kind(single, "Service"))
    assert _arg(_controller(single), "--state-secret") is None
    assert of_kind(single, "PersistentVolumeClaim") != []


def test_the_api_is_on_loopback_unless_it_serves_tls(helm: str) -> None:
    plain = render(helm, [])
    controller = _controller(plain)
    assert _arg(controller, "--api-address") == "127.0.0.1:8470"
    assert _arg(controller, "--api-tls-cert") is None
    assert "api" not in {port["name"] for port in controller["ports"]}  # nothing to reach on the pod IP
    assert not [s for s in of_kind(plain, "Service") if s["metadata"]["name"].endswith("-api")]

    tls = render(helm, ["--set", "api.tls.secretName=east-api-tls"])
    controller = _controller(tls)
    assert _arg(controller, "--api-address") == "0.0.0.0:8470"
    cert, key = _arg(controller, "--api-tls-cert"), _arg(controller, "--api-tls-key")
    assert (cert, key) == ("/etc/meshfed/api-tls/tls.crt", "/etc/meshfed/api-tls/tls.key")
    (mount,) = [m for m in controller["volumeMounts"] if m["mountPath"] == "/etc/meshfed/api-tls"]
    assert mount["readOnly"] is True
    spec = one(tls, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "east-api-tls"
    assert {item["key"] for item in volume["secret"]["items"]} == {"tls.crt", "tls.key"}  # kubernetes.io/tls keys
    assert {port["name"]: port["containerPort"] for port in controller["ports"]}["api"] == 8470
    api = one(tls, "Service", "-api")
    assert [(port["name"], port["targetPort"]) for port in api["spec"]["ports"]] == [("https-api", "api")]
    for manifests in (plain, tls):
        controller = _controller(manifests)
        assert {probe["httpGet"]["port"] for probe in _probes(controller)} == {"metrics"}
        metrics = one(manifests, "Service", "-metrics")
        assert [(port["port"], port["targetPort"]) for port in metrics["spec"]["ports"]] == [(9470, "metrics")]


def _probes(controller: Manifest) -> list[Manifest]:
    return [controller[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")]


def _ports_of(rule: Manifest) -> set[str | int]:
    return {port["port"] for port in rule.get("ports", [])}


@pytest.mark.parametrize("values", CASES)
def test_the_network_policy_selects_the_zone_and_names_its_ports(helm: str, values: list[str]) -> None:
    manifests = render(helm, values)
    policies = of_kind(manifests, "NetworkPolicy")
    deployments = of_kind(manifests, "Deployment")
    assert len(policies) == len(deployments)
    for deployment in deployments:
        pod = deployment["spec"]["template"]
        labels = {**pod["metadata"]["labels"], "meshfed.io/leader": "true"}  # a leader's pod too
        # Exactly one policy for each Deployment's pods (the controller's and the gateway's).
        (policy,) = [p["spec"] for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], labels)]
        (container,) = pod["spec"]["containers"]
        declared = {port["name"]: port["containerPort"] for port in container["ports"]}
        for rule in policy["ingress"]:
            for port in rule["ports"]:
                # A named port the pod does not declare would silently admit nothing.
                assert isinstance(port["port"], int) or port["port"] in declared, port
        # Open to any source: exactly the ports peers dial (a gateway pod serves the gateway alone).
        (open_rule,) = [rule for rule in policy["ingress"] if "from" not in rule]
        if deployment is gateway_deployment(manifests):
            assert _ports_of(open_rule) == {"gateway"}
            # Each port from where the controller's is admitted (the CONNECT port by name here).
            controller = _sources_by_port(policy_of(manifests, controller_deployment(manifests)))
            for (port, end), sources in _sources_by_port(policy).items():
                where: str | int = declared["egress-connect"] if port == "egress-connect" else port
                assert controller[(where, end)] == sources, port
        else:
            assert _ports_of(open_rule) <= {"gateway", "peering", "establish", "bundle"}
            assert {"gateway", "peering", "establish"} <= _ports_of(open_rule)


def policy_of(manifests: list[Manifest], deployment: Manifest) -> Manifest:
    labels = {**pod_labels_of(deployment), "meshfed.io/leader": "true"}
    (policy,) = [
        p["spec"]
        for p in of_kind(manifests, "NetworkPolicy")
        if selects(p["spec"]["podSelector"]["matchLabels"], labels)
    ]
    return dict(policy)


def _sources_by_port(policy: Manifest) -> dict[tuple[str | int, int | None], list[Manifest] | None]:
    """(port, endPort) -> the peers a policy admits there (None: any source)."""
    return {
        (port["port"], port.get("endPort")): rule.get("from") for rule in policy["ingress"] for port in rule["ports"]
    }


def test_the_default_network_policy_admits_only_what_a_zone_needs(helm: str) -> None:
    policy = one(render(helm, []), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]  # egress open: catalog, peers, DNS
    assert "egress" not in policy
    rules = {frozenset(map(str, _ports_of(rule))): rule.get("from") for rule in policy["ingress"]}
    assert rules == {
        frozenset({"gateway", "peering", "establish"}): None,
        frozenset({"metrics"}): [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        frozenset({"15500"}): [{"namespaceSelector": {}}],
    }
    (listeners,) = [rule for rule in policy["ingress"] if 15500 in _ports_of(rule)]
    assert listeners["ports"] == [{"port": 15500, "endPort": 16499, "protocol": "TCP"}]
    # The API is on loopback: no rule admits its port, from anywhere.
    assert not [rule for rule in policy["ingress"] if "api" in _ports_of(rule)]


def test_the_network_policy_follows_the_values(helm: str) -> None:
    ops = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}}}]
    rule = {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}], "ports": [{"port": 15443}]}
    manifests = render(
        helm,
        [
            *("--set", "api.tls.secretName=east-api-tls", "--set", "bundleEndpoint.enabled=true"),
            *("--set-json", f"networkPolicy.api.from={json.dumps(ops)}"),
            *("--set", "networkPolicy.metrics.from=null", "--set", "networkPolicy.egress.restrict=true"),
            *("--set-json", f"networkPolicy.egress.rules={json.dumps([rule])}"),
            *("--set", "gateway.egressPortBase=65000", "--set", "networkPolicy.egressListeners.ports=1000"),
        ],
    )
    policy = one(manifests, "NetworkPolicy")["spec"]
    by_ports = {frozenset(map(str, _ports_of(rule))): rule for rule in policy["ingress"]}
    assert set(by_ports) == {
        frozenset({"gateway", "peering", "establish", "bundle"}),
        frozenset({"api"}),
        frozenset({"65000"}),
    }
    assert by_ports[frozenset({"api"})]["from"] == ops
    assert by_ports[frozenset({"65000"})]["ports"][0]["endPort"] == 65535  # clamped to the last port
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    dns, *rest = policy["egress"]
    assert dns == {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    assert rest == [rule]

    assert of_kind(render(helm, ["--set", "networkPolicy.enabled=false"]), "NetworkPolicy") == []
    ephemeral = run_helm(
        helm, "template", "east", str(CHART), "--kube-version", KUBE_VERSION, "--set", "gateway.egressPortBase=0"
    )
    assert ephemeral.returncode != 0
    assert "networkPolicy.enabled needs a fixed gateway.egressPortBase" in ephemeral.stderr


def test_authz_and_egress_values_become_zone_toml_tables(helm: str) -> None:
    authz = [
        {
            "service": "cart",
            "namespace": "shop",
            "port": 8080,
            "action": "allow",
            "id": "spiffe://west.mesh/ns/shop/sa/web",
        },
        {"service": "cart", "action": "deny", "id": "*"},
    ]
    imports = [
        {"service": "payments", "namespace": "shop", "workloadTls": "strict"},
        {"peer": "west", "service": "search", "workloadTls": "plain"},
    ]
    manifests = render(
        helm,
        [
            *("--set-json", f"authz={json.dumps(authz)}"),
            *("--set", "egress.workloadTls=permissive", "--set-json", f"egress.imports={json.dumps(imports)}"),
        ],
    )
    text = one(manifests, "ConfigMap")["data"]["zone.toml"]
    document = tomllib.loads(text)
    assert document["authz"] == [
        {
            "service": "cart",
            "namespace": "shop",
            "port": 8080,
            "action": "allow",
            "id": "spiffe://west.mesh/ns/shop/sa/web",
        },
        {"service": "cart", "namespace": "default", "action": "deny", "id": "*"},
    ]
    assert document["egress"] == {
        "workload_tls": "permissive",
        "import": [
            {"service": "payments", "namespace": "shop", "workload_tls": "strict"},
            {"peer": "west", "service": "search", "namespace": "default", "workload_tls": "plain"},
        ],
    }
    config = ZoneConfig.model_validate(document)  # the models the zone reads them with
    assert [(rule.service, rule.port, rule.action) for rule in config.authz] == [
        ("cart", 8080, "allow"),
        ("cart", None, "deny"),
    ]
    assert config.egress.mode("payments", "shop", "east") == "strict"
    assert config.egress.mode("search", "default", "west") == "plain"
    assert config.egress.mode("search", "default", "north") == "permissive"

    # The defaults write neither table: no rules, and plain is what a zone without [egress] does.
    defaults = tomllib.loads(one(render(helm, []), "ConfigMap")["data"]["zone.toml"])
    assert "authz" not in defaults
    assert "egress" not in defaults
    only_imports = render(helm, ["--set-json", f"egress.imports={json.dumps(imports[:1])}"])
    assert tomllib.loads(one(only_imports, "ConfigMap")["data"]["zone.toml"])["egress"] == {
        "workload_tls": "plain",
        "import": [{"service": "payments", "namespace": "shop", "workload_tls": "strict"}],
    }


def test_notes_document_the_port_forward_and_the_tokens(helm: str, tmp_path: Path) -> None:
    # helm renders NOTES.txt only on install; a copy of the chart renders it into a ConfigMap instead.
    chart = tmp_path / "meshfed"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n'
    )

    def notes(*values: str) -> str:
        result = run_helm(
            helm,
            "template",
            "east",
            str(chart),
            "-n",
            NAMESPACE,
            "--kube-version",
            KUBE_VERSION,
            "--show-only",
            "templates/zz-notes.yaml",
            *values,
        )
        assert result.returncode == 0, result.stderr
        return str(yaml.safe_load(result.stdout)["data"]["notes"])

    plain = notes()
    assert f"kubectl -n {NAMESPACE} port-forward deploy/east-meshfed 8470:8470" in plain
    assert "listens on 127.0.0.1 inside the pod only" in plain
    assert "curl http://127.0.0.1:8470/v1/catalog" in plain
    assert "east-meshfed-read-token" in plain
    assert "east-meshfed-admin-token" in plain
    tls = notes("--set", "api.tls.secretName=east-api-tls")
    assert "serves HTTPS (certificate from Secret east-api-tls) on Service" in tls
    assert "none yet: set it" in tls
    assert "curl -k https://127.0.0.1:8470/v1/catalog" in tls
    # With several pods, commands go to the leader's (a follower refuses changes and serves no API).
    leader = "$(kubectl -n meshfed-system get pod -o name -l meshfed.io/leader=true,app.kubernetes.io/instance=east)"
    highly_available = notes("--set", "highAvailability.enabled=true")
    assert f"kubectl -n {NAMESPACE} port-forward {leader} 8470:8470" in highly_available
    assert f"kubectl -n {NAMESPACE} exec {leader} -- \\\n       meshfed peer token" in highly_available
    assert "rollout status deploy/east-meshfed" in highly_available
    assert "deploy/east-meshfed-gateway" not in highly_available
    # The gateway's own Deployment: how to watch its rollout and find its pods.
    gateways = notes("-f", str(GATEWAY_REPLICAS))
    assert f"kubectl -n {NAMESPACE} rollout status deploy/east-meshfed-gateway" in gateways
    assert "get pods -l app.kubernetes.io/instance=east,app.kubernetes.io/component=gateway" in gateways
    assert "Secret east-meshfed-state-gateway" in gateways


def test_tokens_name_the_peering_service_by_default(helm: str) -> None:
    """With default values a token must not say 127.0.0.1: the dialing zone would connect to itself."""
    manifests = render(helm, [])
    peering = one(manifests, "Service", "-peering")
    expected = f"{peering['metadata']['name']}.{NAMESPACE}.svc"
    assert _arg(_controller(manifests), "--advertise-host") == expected
    chosen = render(helm, ["--set", "peering.advertiseHost=east.example.net"])
    assert _arg(_controller(chosen), "--advertise-host") == "east.example.net"


def test_the_connect_egress_values_become_flags_and_a_policy_port(helm: str) -> None:
    manifests = render(helm, ["-f", str(CHART / "examples" / "connect-egress.yaml")])
    controller = _controller(manifests)
    assert _arg(controller, "--egress-connect-address") == "0.0.0.0:15499"
    assert "--no-per-import-listeners" in controller["args"]
    (policy,) = of_kind(manifests, "NetworkPolicy")
    admitted = {port["port"] for rule in policy["spec"]["ingress"] for port in rule.get("ports", [])}
    assert 15499 in admitted
    defaults = _controller(render(helm, []))
    assert _arg(defaults, "--egress-connect-address") is None
    assert "--no-per-import-listeners" not in defaults["args"]


def test_the_gateway_runs_as_its_own_deployment_of_replicas_rolled_one_at_a_time(helm: str) -> None:
    manifests = render(helm, ["-f", str(GATEWAY_REPLICAS)])
    gateway = gateway_deployment(manifests)
    assert gateway is not None
    controller = controller_deployment(manifests)
    assert gateway["metadata"]["name"] == f"{controller['metadata']['name']}-gateway"
    assert gateway["spec"]["replicas"] == 3
    # One new pod Ready before an old one stops, for the gateways and for the controllers (followers
    # are Ready, and a leader stopped cleanly hands over).
    rolling = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert gateway["spec"]["strategy"] == rolling
    assert controller["spec"]["strategy"] == rolling
    gateway_pods = pod_labels_of(gateway)
    assert gateway_pods["app.kubernetes.io/component"] == "gateway"
    # Neither Deployment selects the other's pods, whatever leader label a controller's pod carries.
    controller_pods = [{**pod_labels_of(controller), "meshfed.io/leader": leader} for leader in ("true", "false")]
    assert selects(gateway["spec"]["selector"]["matchLabels"], gateway_pods)
    assert not selects(controller["spec"]["selector"]["matchLabels"], gateway_pods)
    assert not any(selects(gateway["spec"]["selector"]["matchLabels"], pod) for pod in controller_pods)
    # The gateway Service selects the gateway pods alone; the others the leader alone.
    for service in of_kind(manifests, "Service"):
        selector = service["spec"]["selector"]
        if service["metadata"]["name"].endswith("-gateway"):
            assert selects(selector, gateway_pods)
            assert not any(selects(selector, pod) for pod in controller_pods)
        else:
            assert not selects(selector, gateway_pods), service["metadata"]["name"]
            assert [selects(selector, pod) for pod in controller_pods] == [True, False], service["metadata"]["name"]
    # A budget for each, neither covering the other's pods.
    (budget,) = [
        b
        for b in of_kind(manifests, "PodDisruptionBudget")
        if selects(b["spec"]["selector"]["matchLabels"], gateway_pods)
    ]
    assert budget["spec"]["maxUnavailable"] == 1
    assert not any(selects(budget["spec"]["selector"]["matchLabels"], pod) for pod in controller_pods)
    assert len(of_kind(manifests, "PodDisruptionBudget")) == 2
    # The leader publishes the feed; the replicas serve it.
    assert "--gateway-feed" in _controller(manifests)["args"]
    spec = gateway["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert {port["name"]: port["containerPort"] for port in container["ports"]} == {"metrics": 9470, "gateway": 15443}
    assert [probe["httpGet"] for probe in _probes(container)] == [
        {"path": "/healthz", "port": "metrics"},
        {"path": "/healthz", "port": "metrics"},
        {"path": "/readyz", "port": "metrics"},
    ]
    assert spec["automountServiceAccountToken"] is True
    accounts = {m["metadata"]["name"] for m in of_kind(manifests, "ServiceAccount")}
    assert spec["serviceAccountName"] == "east-meshfed-gateway"
    assert accounts == {"east-meshfed", "east-meshfed-gateway"}
    assert [volume["name"] for volume in spec["volumes"]] == ["tmp"]  # no zone directory, no token files
    (spread,) = spec["topologySpreadConstraints"]
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]
    assert_gateway_rbac(manifests)
    # zone.toml changes roll the controllers, not the gateways (which do not read it).
    authz = [{"service": "cart", "action": "deny", "id": "*"}]
    changed = render(helm, ["-f", str(GATEWAY_REPLICAS), "--set-json", f"authz={json.dumps(authz)}"])
    assert controller_deployment(changed)["spec"]["template"] != controller["spec"]["template"]
    changed_gateway = gateway_deployment(changed)
    assert changed_gateway is not None
    assert changed_gateway["spec"]["template"] == gateway["spec"]["template"]
    # Off by default, with highAvailability too: the leader's process serves the gateway Service.
    for values in ([], ["--set", "highAvailability.enabled=true"]):
        alone = render(helm, values)
        assert gateway_deployment(alone) is None
        assert "--gateway-feed" not in _controller(alone)["args"]
        leader = {**pod_labels_of(controller_deployment(alone)), "meshfed.io/leader": "true"}
        assert selects(one(alone, "Service", "-gateway")["spec"]["selector"], leader)


def test_the_gateway_pods_serve_the_connect_listener_and_are_admitted_to_it(helm: str) -> None:
    manifests = render(helm, ["-f", str(CHART / "examples" / "connect-egress.yaml"), "-f", str(GATEWAY_REPLICAS)])
    gateway = gateway_deployment(manifests)
    assert gateway is not None
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    assert {port["name"]: port["containerPort"] for port in container["ports"]}["egress-connect"] == 15499
    policy = policy_of(manifests, gateway)
    assert _sources_by_port(policy)[("egress-connect", None)] == [{"namespaceSelector": {}}]
    assert set(_sources_by_port(policy)) == {
        ("gateway", None),
        ("metrics", None),
        (15500, 16499),
        ("egress-connect", None),
    }
    # Restricted egress: DNS and the same rules as the controller's (the API server, peers, endpoints).
    rule = {"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}], "ports": [{"port": 6443}]}
    restricted = render(
        helm,
        [
            *("-f", str(GATEWAY_REPLICAS), "--set", "networkPolicy.egress.restrict=true"),
            *("--set-json", f"networkPolicy.egress.rules={json.dumps([rule])}"),
        ],
    )
    gateway = gateway_deployment(restricted)
    assert gateway is not None
    egress = policy_of(restricted, gateway)
    assert egress["policyTypes"] == ["Ingress", "Egress"]
    assert egress["egress"] == policy_of(restricted, controller_deployment(restricted))["egress"]
    assert egress["egress"][1:] == [rule]


def test_a_gateway_deployment_needs_high_availability(helm: str) -> None:
    result = run_helm(
        helm, "template", "east", str(CHART), "--kube-version", KUBE_VERSION, "--set", "gateway.deployment.enabled=true"
    )
    assert result.returncode != 0
    (line,) = [line for line in result.stderr.splitlines() if "gateway.deployment.enabled" in line]
    assert "gateway.deployment.enabled needs highAvailability.enabled=true: set it too" in line, result.stderr


def test_the_gateway_pods_never_share_the_controllers_service_account(helm: str) -> None:
    shared = ["-f", str(GATEWAY_REPLICAS), "--set", "serviceAccount.create=false"]
    result = run_helm(helm, "template", "east", str(CHART), "--kube-version", KUBE_VERSION, *shared)
    assert result.returncode != 0
    assert "gateway.deployment.serviceAccount.name must name a ServiceAccount other than the controller's" in (
        result.stderr
    )
    named = render(helm, [*shared, "--set", "gateway.deployment.serviceAccount.name=east-gateway"])
    assert of_kind(named, "ServiceAccount") == []  # both exist already
    gateway = gateway_deployment(named)
    assert gateway is not None
    assert gateway["spec"]["template"]["spec"]["serviceAccountName"] == "east-gateway"
    assert_gateway_rbac(named)
    without = render(helm, ["-f", str(GATEWAY_REPLICAS), "--set", "rbac.create=false"])
    assert [m for m in without if m["kind"] in RBAC_KINDS] == []


def test_with_a_gateway_deployment_mirrors_select_the_gateway_pods(helm: str) -> None:
    kubernetes = ["-f", str(GATEWAY_REPLICAS), "--set", "catalog.mode=kubernetes"]
    manifests = render(helm, kubernetes)
    config = ZoneConfig.model_validate(tomllib.loads(one(manifests, "ConfigMap")["data"]["zone.toml"]))
    assert config.kubernetes is not None
    gateway = gateway_deployment(manifests)
    assert gateway is not None
    # Exactly the gateway Deployment's pods, in the namespace they run in; never a controller's.
    mirror_selector = config.kubernetes.mirror_selector
    assert mirror_selector is not None
    assert mirror_selector == gateway["spec"]["selector"]["matchLabels"]
    assert config.kubernetes.mirror_namespace == NAMESPACE
    assert not selects(mirror_selector, pod_labels_of(controller_deployment(manifests)))
    # Without a gateway Deployment the mirrors hold the leader pod's address, as before.
    plain = render(helm, ["--set", "catalog.mode=kubernetes"])
    assert "mirror_selector" not in tomllib.loads(one(plain, "ConfigMap")["data"]["zone.toml"])["kubernetes"]
    # A Service selects pods of its own namespace only: mirrors elsewhere would select nothing.
    elsewhere = run_helm(
        helm,
        *("template", "east", str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION),
        *(*kubernetes, "--set", "catalog.kubernetes.mirrorNamespace=imports"),
    )
    assert elsewhere.returncode != 0
    (line,) = [line for line in elsewhere.stderr.splitlines() if "mirrorNamespace" in line]
    assert "leave catalog.kubernetes.mirrorNamespace empty or set it to the release namespace" in line
