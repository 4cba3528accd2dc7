"""The zone's state kept in its platform (``meshfed.replica``), against the real kube-apiserver and the real Consul.

Each test runs on both stores: Secrets (as the ServiceAccount `helm install`
gives a highly available zone, so the chart's Role is the one that works) and
Consul KV (a token made from the documented ACL policy, so its ``key_prefix``
rule is). An idle zone publishes nothing, though its process rewrites leases
and heartbeat times every second. A replica restores into a fresh directory as the
same zone; a change uploads the pieces it touched; a writer whose leadership
passed is fenced off; and a replica someone else wrote wrongly is refused
whole, leaving the directory as it was.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import subprocess
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from meshfed.catalog.consul_api import ConsulApi
from meshfed.catalog.kubernetes_api import KubernetesApi
from meshfed.catalog.settings import ConsulSettings, KubernetesSettings
from meshfed.federation.peering_store import PeeringStore
from meshfed.leadership import LeaseElector, LeaseSettings
from meshfed.leadership.pod_label import LeaderPod, PodLabel
from meshfed.replica.files import MARKER_FILE, replicated_paths, take_copy
from meshfed.replica.manifest import PIECE_SIZE, ReplicaError, new_manifest
from meshfed.replica.replicator import ReplicaConflictError, StateReplica
from meshfed.replica.stores import REPLICA_LABEL, KvStore, ReplicaStore, SecretStore
from meshfed.runstate import RunState
from meshfed.store import StateStore
from meshfed.trust.bundle import TrustBundle
from meshfed.trust.ca import create_authority
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import STATE_FILE, Zone
from tests.clocks import ManualClock
from tests.servers import real_consul, real_kubernetes
from tests.test_catalog_consul import ConsulUnderTest
from tests.test_catalog_kubernetes import Cluster


@dataclass(frozen=True)
class ChartAccount:
    """The ServiceAccount `helm install` gives a highly available zone: its kubeconfig, its namespace."""

    kubeconfig: Path
    namespace: str


@pytest.fixture(scope="module")
def chart_account(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChartAccount]:
    cluster = Cluster("real", tmp_path_factory.mktemp("cluster"))
    try:
        kubeconfig = cluster.install_chart(["--set", "highAvailability.enabled=true"])
        yield ChartAccount(kubeconfig, cluster.account[0])
    finally:
        cluster.close()


@dataclass(frozen=True)
class Platform:
    kind: str  # "secret" or "kv"
    account: ChartAccount | None = None  # for Secrets


@pytest.fixture(params=["secret", "kv"])
def platform(request: pytest.FixtureRequest) -> Platform:
    if request.param == "secret":  # only Secrets need the chart installed
        return Platform("secret", request.getfixturevalue("chart_account"))
    return Platform("kv")


@asynccontextmanager
async def replica_store(platform: Platform, tmp_path: Path) -> AsyncIterator[tuple[ReplicaStore, ReplicaStore]]:
    """Two clients of one new replica (two processes' views): each test's own Secret name or KV prefix.

    Secrets are written as the chart's ServiceAccount, with exactly the rights the chart grants."""
    if platform.account is not None:
        account = platform.account
        name = f"meshfed-test-{uuid.uuid4().hex[:8]}"
        apis = [KubernetesApi(KubernetesSettings(kubeconfig=str(account.kubeconfig))) for _ in range(2)]
        for api in apis:
            await api.connect()
        try:
            yield SecretStore(apis[0], account.namespace, name), SecretStore(apis[1], account.namespace, name)
        finally:
            listed = await apis[0].request(
                apis[0].list_call("secrets", account.namespace, label_selector=f"{REPLICA_LABEL}={name}")
            )
            for item in listed["items"]:
                await apis[0].request(apis[0].delete_call("secrets", account.namespace, item["metadata"]["name"]))
            for api in apis:
                await api.aclose()
        return
    real = real_consul()
    consul = ConsulUnderTest(real.address, real.management_token)
    token = consul.meshfed_token(tmp_path)
    prefix = f"meshfed/{consul.zone}/state"
    clients = [
        ConsulApi(ConsulSettings(address=real.address, token_file=str(token)), node=consul.node, blocking_wait=1)
        for _ in range(2)
    ]
    try:
        yield KvStore(clients[0], prefix), KvStore(clients[1], prefix)
    finally:
        for client in clients:
            await client.aclose()
        consul.call("DELETE", f"/v1/kv/{prefix}?recurse=true")
        consul.cleanup()


def replica_of(store: ReplicaStore, directory: Path, writer: str) -> StateReplica:
    return StateReplica(store, directory, zone="east", trust_domain="east.mesh", writer=writer)


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def rows_of(database: Path) -> dict[str, list[tuple[object, ...]]]:
    with closing(sqlite3.connect(database)) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")]
        return {table: sorted(db.execute(f"SELECT * FROM {table}"), key=repr) for table in tables}


def federate_with(directory: Path, trust_domain: str) -> TrustBundle:
    """Give the zone in ``directory`` a state change: another domain's bundle."""
    bundle = TrustBundle(TrustDomain(trust_domain), (create_authority(TrustDomain(trust_domain)).authority.root,))
    with StateStore(directory / STATE_FILE) as store:
        store.put_bundle(bundle, source="cli")
    return bundle


def domains_of(directory: Path) -> set[TrustDomain]:
    with Zone.open(directory).store() as store:
        return {TrustDomain(str(stored.bundle.trust_domain)) for stored in store.bundles()}


def test_a_fresh_directory_restored_from_the_replica_is_the_same_zone(platform: Platform, tmp_path: Path) -> None:
    """Pod and volume gone: the new pod's `zone init` made another CA; the replica puts the zone's back."""
    original = Zone.init(tmp_path / "a", "east", "east.mesh")
    federate_with(original.directory, "west.mesh")
    with RunState(original.directory) as run:
        run.take_lease()  # a live controller's row: a copy must not claim it

    async def scenario() -> None:
        async with replica_store(platform, tmp_path) as (first, second):
            said = await replica_of(first, original.directory, "east-a").start()
            assert "no replica yet; published this directory as generation 1" in said
            fresh = Zone.init(tmp_path / "b", "east", "east.mesh")
            assert (fresh.directory / "ca/root.pem").read_bytes() != (original.directory / "ca/root.pem").read_bytes()
            restored = replica_of(second, fresh.directory, "east-b")
            said = await restored.start()
            assert "restored generation 1 (written by 'east-a'" in said

    asyncio.run(scenario())
    before, after = files_of(original.directory), files_of(tmp_path / "b")
    for path in replicated_paths(original.directory):
        if path != STATE_FILE:
            assert after[path] == before[path], path
        assert (tmp_path / "b" / path).stat().st_mode == (original.directory / path).stat().st_mode, path
    ours, theirs = rows_of(original.directory / STATE_FILE), rows_of(tmp_path / "b" / STATE_FILE)
    assert ours.pop("controller_lease")
    assert not theirs.pop("controller_lease")
    assert theirs == ours
    zone = Zone.open(tmp_path / "b")
    assert zone.trust.own_bundle() == original.trust.own_bundle()
    assert zone.admin_token() == original.admin_token()
    assert TrustDomain("west.mesh") in domains_of(zone.directory)


def test_a_change_uploads_only_the_pieces_it_touched_and_an_idle_zone_none(platform: Platform, tmp_path: Path) -> None:
    zone = Zone.init(tmp_path / "a", "east", "east.mesh")
    with closing(sqlite3.connect(zone.directory / STATE_FILE)) as db:  # a zone of several pieces
        db.execute("CREATE TABLE ballast (data BLOB)")
        db.executemany("INSERT INTO ballast VALUES (?)", [(n.to_bytes(2, "big") * 2000,) for n in range(1000)])
        db.commit()
    assert (zone.directory / STATE_FILE).stat().st_size > 8 * PIECE_SIZE
    with RunState(zone.directory) as run:  # its tables exist once a controller has run
        run.take_lease()
        run.record_listeners({"egress": ("127.0.0.1", 15001)})
    with PeeringStore.of(zone) as peerings:  # and a peering, whose heartbeats the running service records
        peerings.issue_token(zone, "west", ["127.0.0.1:15440"])
        peerings.record_listener(["127.0.0.1:15441"], ["127.0.0.1:15440"])

    async def scenario() -> None:
        async with replica_store(platform, tmp_path) as (store, _):
            replica = replica_of(store, zone.directory, "east-a")
            await replica.start()
            stored = await store.pieces()
            with RunState(zone.directory) as run:  # a controller's own rows change every second
                run.take_lease()
                run.renew_lease()
                run.record_listeners({"egress": ("127.0.0.1", 15002), "ingress": ("127.0.0.1", 15443)})
            with PeeringStore.of(zone) as peerings:  # and so do its peering service's
                peerings.renew_lease()
                beat = dt.datetime.now(dt.UTC)
                peerings.update("west", last_heartbeat_sent_at=beat, last_heartbeat_received_at=beat, connected=True)
            assert not await replica.publish()
            federate_with(zone.directory, "west.mesh")
            assert await replica.publish()
            now = await store.pieces()
            assert 1 <= len(now - stored) <= 3, len(now - stored)  # the pages the change wrote
            assert len(now) == len(stored)  # and the pieces they replaced are gone
            assert replica.generation == 2

    asyncio.run(scenario())


def test_a_writer_whose_successor_published_is_fenced_off(platform: Platform, tmp_path: Path) -> None:
    Zone.init(tmp_path / "a", "east", "east.mesh")
    Zone.init(tmp_path / "b", "east", "east.mesh")

    async def scenario() -> None:
        async with replica_store(platform, tmp_path) as (old_store, new_store):
            old = replica_of(old_store, tmp_path / "a", "east-a")
            await old.start()
            new = replica_of(new_store, tmp_path / "b", "east-b")
            await new.start()  # took over: restored generation 1
            federate_with(tmp_path / "b", "north.mesh")
            assert await new.publish()
            federate_with(tmp_path / "a", "south.mesh")
            with pytest.raises(ReplicaConflictError, match=r"written by 'east-b' \(generation 2\).*this one stops"):
                await old.publish()
            # The successor's publication stands, whole.
            again = replica_of(old_store, tmp_path / "c", "east-c")
            Zone.init(tmp_path / "c", "east", "east.mesh")
            assert "restored generation 2 (written by 'east-b'" in await again.start()

    asyncio.run(scenario())
    domains = domains_of(tmp_path / "c")
    assert TrustDomain("north.mesh") in domains
    assert TrustDomain("south.mesh") not in domains


def _manifest_of(directory: Path) -> dict[str, Any]:
    """The manifest a publication of ``directory`` would write, as a document to damage."""
    copy = take_copy(directory)
    return dict(new_manifest("east", "east.mesh", 1, "x", copy.files, dt.datetime.now(dt.UTC)).model_dump(mode="json"))


HOSTILE: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "a path out of the directory": lambda m: orjson.dumps({**m, "files": [{**m["files"][0], "path": "../outside"}]}),
    "an absolute path": lambda m: orjson.dumps({**m, "files": [{**m["files"][0], "path": "/etc/passwd"}]}),
    "another zone": lambda m: orjson.dumps({**m, "zone": "west"}),
    "a newer format": lambda m: orjson.dumps({**m, "format": 2}),
    "not JSON": lambda m: b"\x00garbage",
    "an unknown field": lambda m: orjson.dumps({**m, "extra": 1}),
    "a size its pieces cannot hold": lambda m: orjson.dumps(
        {**m, "files": [{**m["files"][0], "size": 10 * PIECE_SIZE}]}
    ),
    "an oversized manifest": lambda m: b'{"files": "' + b"x" * (300 * 1024) + b'"}',
    "a file the zone does not replicate": lambda m: orjson.dumps(
        {**m, "files": [{**m["files"][0], "path": "zone.toml"}]}
    ),
}

REFUSALS = {
    "a path out of the directory": "names '../outside', not a file inside a zone directory",
    "an absolute path": "names '/etc/passwd', not a file inside a zone directory",
    "another zone": "holds zone 'west' (trust domain east.mesh), not this zone 'east'",
    "a newer format": "of format 2; this meshfed reads format 1",
    "not JSON": "the manifest is not JSON",
    "an unknown field": "malformed at extra",
    "a size its pieces cannot hold": "pieces cannot hold",
    "an oversized manifest": "over the 262,144 allowed",
    "a file the zone does not replicate": "names 'zone.toml', which is not a file a replica holds",
}


@pytest.mark.parametrize("damage", sorted(HOSTILE))
def test_a_replica_written_wrongly_is_refused_whole_and_the_directory_kept(
    platform: Platform, damage: str, tmp_path: Path
) -> None:
    zone = Zone.init(tmp_path / "a", "east", "east.mesh")
    raw = HOSTILE[damage](_manifest_of(zone.directory))
    before = files_of(zone.directory)

    async def scenario() -> None:
        async with replica_store(platform, tmp_path) as (store, _):
            assert await store.write_manifest(raw, None) is not None
            with pytest.raises(ReplicaError) as refused:
                await replica_of(store, zone.directory, "east-a").start()
            assert REFUSALS[damage] in str(refused.value)
            assert store.where in str(refused.value)
            assert "\n" not in str(refused.value)

    asyncio.run(scenario())
    assert files_of(zone.directory) == before


def test_a_piece_that_is_not_what_its_name_says_is_refused_and_the_directory_kept(
    platform: Platform, tmp_path: Path
) -> None:
    source = Zone.init(tmp_path / "a", "east", "east.mesh")
    target = Zone.init(tmp_path / "b", "east", "east.mesh")
    before = files_of(target.directory)

    async def scenario() -> None:
        async with replica_store(platform, tmp_path) as (store, other):
            await replica_of(store, source.directory, "east-a").start()
            manifest = orjson.loads((await store.read_manifest() or (b"", ""))[0])
            digest = manifest["files"][0]["pieces"][0]
            await store.delete_piece(digest)
            await store.write_piece(digest, zlib.compress(b"not the piece"))
            with pytest.raises(ReplicaError, match=f"piece {digest[:12]} does not hold the bytes its name says"):
                await replica_of(other, target.directory, "east-b").start()
            await store.delete_piece(digest)
            await store.write_piece(digest, zlib.compress(b"\0" * (PIECE_SIZE + 1)))
            with pytest.raises(ReplicaError, match="does not inflate to one piece"):
                await replica_of(other, target.directory, "east-b").start()

    asyncio.run(scenario())
    assert files_of(target.directory) == before
    assert not (target.directory / MARKER_FILE).exists()


def test_files_the_replica_does_not_name_are_removed_and_the_marker_written_last(
    platform: Platform, tmp_path: Path
) -> None:
    source = Zone.init(tmp_path / "a", "east", "east.mesh")
    target = Zone.init(tmp_path / "b", "east", "east.mesh")
    stray = target.directory / "ca" / "generations" / "7" / "root.pem"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"a generation the zone never had")
    (target.directory / STATE_FILE).with_name(f"{STATE_FILE}-wal").write_bytes(b"a log of another database")

    async def scenario() -> None:
        async with replica_store(platform, tmp_path) as (store, other):
            await replica_of(store, source.directory, "east-a").start()
            await replica_of(other, target.directory, "east-b").start()

    asyncio.run(scenario())
    assert not stray.exists()
    assert not (target.directory / f"{STATE_FILE}-wal").exists()
    marker = orjson.loads((target.directory / MARKER_FILE).read_bytes())
    assert marker["generation"] == 1
    assert Zone.open(target.directory).trust.own_bundle() == source.trust.own_bundle()


def test_the_same_directory_restarted_keeps_what_it_wrote_since_and_publishes_it(
    platform: Platform, tmp_path: Path
) -> None:
    """The pod restarted with its volume: the directory holds the replica's generation and more; nothing is lost."""
    zone = Zone.init(tmp_path / "a", "east", "east.mesh")

    async def scenario() -> None:
        async with replica_store(platform, tmp_path) as (store, other):
            await replica_of(store, zone.directory, "east-a").start()
            federate_with(zone.directory, "west.mesh")  # written, then the process died before publishing
            said = await replica_of(other, zone.directory, "east-a").start()
            assert "holds generation 1; published what it wrote since as generation 2" in said
            raw, _ = await other.read_manifest() or (b"", "")
            assert orjson.loads(raw)["generation"] == 2

    asyncio.run(scenario())
    assert TrustDomain("west.mesh") in domains_of(zone.directory)


def test_the_charts_account_may_campaign_for_the_zones_lease_and_label_its_pod(chart_account: ChartAccount) -> None:
    """The other half of what a highly available install's pods do with the chart's Role alone."""
    kube = real_kubernetes()
    admin = [kube.kubectl, "--kubeconfig", kube.admin_kubeconfig, "-n", chart_account.namespace]
    pod = f"east-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(
        [*admin, "run", pod, "--image=registry.example/meshfed", "--restart=Never"], capture_output=True, check=False
    )
    assert made.returncode == 0, made.stderr

    async def scenario() -> None:
        api = KubernetesApi(KubernetesSettings(kubeconfig=str(chart_account.kubeconfig)))
        await api.connect()
        try:
            lease = LeaseSettings(chart_account.namespace, f"meshfed-test-{uuid.uuid4().hex[:8]}", "east-a")
            elector = LeaseElector(api, lease, ManualClock())
            assert await elector.try_acquire_or_renew()  # creates the Lease
            assert await elector.try_acquire_or_renew()  # renews it
            await elector.release()
            follower = LeaseElector(api, LeaseSettings(lease.namespace, lease.name, "east-b"), ManualClock())
            assert await follower.try_acquire_or_renew()  # released: taken at once
            await PodLabel(api, LeaderPod(chart_account.namespace, pod)).mark(leading=True)
        finally:
            await api.aclose()

    asyncio.run(scenario())
    labels = subprocess.run(
        [*admin, "get", "pod", pod, "-o", "jsonpath={.metadata.labels}"], capture_output=True, text=True, check=True
    )
    assert orjson.loads(labels.stdout)["meshfed.io/leader"] == "true"
    assert orjson.loads(labels.stdout)["run"] == pod  # a patch of one label: the others stay
