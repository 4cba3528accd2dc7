"""The gateway feed (``meshfed.replica.gateway_feed``) between a leader and its gateway replicas, on both real stores.

A replica applies each publication once; a deposed leader cannot overwrite its
successor's; and a feed someone else wrote wrongly — any of a dozen ways — is
refused with a line naming the object, while the replica keeps serving the
config it applied before, on the same sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import socket
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest

from meshfed.catalog.kubernetes_api import KubernetesApi, NotFoundError
from meshfed.catalog.settings import KubernetesSettings
from meshfed.gateway.config import Cluster, Endpoint, GatewayConfig, Identity, PassthroughListener, Route
from meshfed.gateway_replica import GatewayReplica
from meshfed.replica.gateway_feed import (
    MAX_PARTS,
    FeedHeader,
    FeedPublisher,
    FeedReader,
    decode_feed,
    encode_feed,
    feed_header,
)
from meshfed.replica.manifest import ReplicaError
from meshfed.replica.replicator import ReplicaConflictError
from meshfed.replica.stores import ReplicaStore, SecretStore
from meshfed.zone import Zone
from tests.clocks import ManualClock
from tests.test_replica import Platform, chart_account, platform, replica_store

__all__ = ["chart_account", "platform"]  # fixtures, used by name


def _config(*snis: str) -> GatewayConfig:
    routes = [Route(sni=sni, cluster="backend") for sni in snis]
    return GatewayConfig(
        listeners=[PassthroughListener(name="in", address="127.0.0.1:0", routes=routes)],
        clusters=[Cluster(name="backend", endpoints=[Endpoint(address="127.0.0.1:9")])],
    )


def _header(config: bytes, **changes: object) -> FeedHeader:
    fields: dict[str, object] = {
        "zone": "east",
        "trust_domain": "east.mesh",
        "writer": "intruder",
        "generation": 99,
        "written_at": "2026-12-04T00:00:00.000+00:00",
        "size": len(config),
        "digest": hashlib.sha256(config).hexdigest(),
    }
    return FeedHeader.model_validate({**fields, **changes})


def _accepts(address: tuple[str, int]) -> bool:
    with socket.create_connection(address, timeout=2):
        return True


def _hostile() -> list[tuple[str, bytes, str]]:
    """(case, stored bytes, what the refusal says): each a feed the replica must refuse."""
    good = _config("a.example").to_json()
    unparsable_config = b'{"listeners": [{"mode": "passthrough", "name": "in", "address": "127.0.0.1:0", "x": 1}]}'
    magic = b"meshfed-gateway-feed/1\n"
    bomb = zlib.compress(b"\0" * (8 << 20))
    return [
        ("not a feed", b"PK\x03\x04 something else", "does not hold a gateway feed"),
        ("empty", b"", "does not hold a gateway feed"),
        ("no header line", magic + b'{"zone": "east"', "header is missing"),
        ("header over 4 KiB", magic + b"{" + b" " * 5000 + b"}\n", "header is missing or over"),
        ("header not JSON", magic + b"{zone: east}\n" + zlib.compress(good), "header is not JSON"),
        (
            "header with an unknown field",
            magic + orjson.dumps({**_header(good).model_dump(), "admin": True}) + b"\n" + zlib.compress(good),
            "header is refused",
        ),
        (
            "header size a string",
            magic + orjson.dumps({**_header(good).model_dump(), "size": "12"}) + b"\n" + zlib.compress(good),
            "header is refused",
        ),
        ("config not zlib", encode_feed(_header(good), good)[0][: -len(zlib.compress(good, 6))] + b"plain", "not zlib"),
        ("config cut short", encode_feed(_header(good), good)[0][:-4], "does not inflate"),
        ("size that lies", encode_feed(_header(good, size=len(good) - 1), good)[0], "does not inflate"),
        (
            "zlib bomb",
            magic + orjson.dumps(_header(b"\0" * 1024, size=1024).model_dump()) + b"\n" + bomb,
            "does not inflate",
        ),
        ("digest of other bytes", encode_feed(_header(good, digest="0" * 64), good)[0], "digest"),
        (
            "a config the data plane refuses",
            encode_feed(_header(unparsable_config), unparsable_config)[0],
            "gateway config rejected",
        ),
        (
            "a config of another zone",
            encode_feed(_header(good, trust_domain="other.mesh"), good)[0],
            "trust domain other.mesh",
        ),
    ]


@pytest.mark.parametrize(("case", "stored", "refusal"), _hostile(), ids=[case for case, _, _ in _hostile()])
def test_a_hostile_feed_is_refused_and_the_replica_keeps_serving(
    platform: Platform, tmp_path: Path, case: str, stored: bytes, refusal: str
) -> None:
    async def scenario() -> None:
        async with replica_store(platform, tmp_path) as (leader_store, replica_side):
            publisher = FeedPublisher(leader_store, zone="east", trust_domain="east.mesh", writer="east-a")
            await publisher.start()
            assert await publisher.publish(_config("a.example").to_json())
            replica = GatewayReplica(FeedReader(replica_side))
            try:
                assert await replica.refresh(), replica.problem
                assert replica.applied is not None
                assert replica.applied.generation == 1
                assert replica.gateway is not None
                address = replica.gateway.address("in")

                found = await leader_store.read_manifest()
                assert found is not None
                assert await leader_store.write_manifest(stored, found[1]) is not None  # whoever may write it
                assert not await replica.refresh()
                assert refusal in replica.problem, replica.problem
                assert leader_store.where in replica.problem  # the object to look at
                # Nothing changed: the same config, the same socket, still serving, and ready (degraded) still.
                assert replica.applied.generation == 1
                assert replica.applied.writer == "east-a"
                assert replica.gateway.address("in") == address
                assert _accepts(address)
                code, body = replica.readiness()
                assert (code, body["status"]) == (200, "degraded"), body
                # Read again, refused again, without a second log line; a good publication is served again.
                assert not await replica.refresh()
                repaired = FeedPublisher(leader_store, zone="east", trust_domain="east.mesh", writer="east-b")
                await repaired.start()
                assert await repaired.publish(_config("a.example", "b.example").to_json())
                assert await replica.refresh()
                assert replica.applied.writer == "east-b"
                assert not replica.problem
                assert replica.readiness()[1]["status"] == "ready"
            finally:
                replica.close()

    asyncio.run(scenario())


def test_each_publication_is_applied_once_and_a_deposed_leader_is_fenced_off(
    platform: Platform, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with replica_store(platform, tmp_path) as (first_store, second_store):
            replica = GatewayReplica(FeedReader(second_store))
            try:
                assert not await replica.refresh()  # nothing published yet: not ready, nothing to say
                assert replica.readiness()[0] == 503
                assert not replica.problem
                old = FeedPublisher(first_store, zone="east", trust_domain="east.mesh", writer="east-a")
                await old.start()
                assert await old.publish(_config("a.example").to_json())
                assert not await old.publish(_config("a.example").to_json())  # the same config: not written again
                assert await replica.refresh()
                assert not await replica.refresh()  # no new publication: nothing applied
                # A new leader takes the feed up where the old one left it...
                new = FeedPublisher(second_store, zone="east", trust_domain="east.mesh", writer="east-b")
                await new.start()
                assert new.generation == 1
                assert await new.publish(_config("a.example", "b.example").to_json())
                # ...and the old one, which has not noticed it lost, cannot overwrite it.
                with pytest.raises(ReplicaConflictError, match="another process"):
                    await old.publish(_config("stale.example").to_json())
                assert await replica.refresh()
                assert replica.applied is not None
                assert (replica.applied.writer, replica.applied.generation) == ("east-b", 2)
            finally:
                replica.close()

    asyncio.run(scenario())


def test_a_config_over_one_object_goes_on_in_parts_and_a_damaged_part_is_refused(
    platform: Platform, tmp_path: Path
) -> None:
    # Random SNIs do not compress: several objects of either store.
    huge = _config(*(f"{hashlib.sha256(str(n).encode()).hexdigest()}.example" for n in range(40_000))).to_json()

    async def scenario() -> None:
        async with feed_stores(platform, tmp_path) as (store, replica_side):
            publisher = FeedPublisher(store, zone="east", trust_domain="east.mesh", writer="east-a")
            await publisher.start()
            assert await publisher.publish(_config("a.example").to_json())
            replica = GatewayReplica(FeedReader(replica_side))
            try:
                assert await replica.refresh()
                assert await publisher.publish(huge)
                header = feed_header((await store.read_manifest() or (b"", ""))[0], "", largest=store.largest)
                assert len(header.parts) >= 1, "the config fits one object: make it larger"
                assert await replica.refresh()
                assert replica.applied is not None
                assert replica.applied.generation == 2
                assert replica.gateway is not None
                assert _accepts(replica.gateway.address("in"))
                # A part someone else rewrote before the replica read it: the first read waits (a publication
                # may be under way: its first object comes last), the next refuses it, and the replica serves
                # what it served. The leader's next publication writes the part again.
                assert await publisher.publish(huge + b" ")
                last = store.sibling(str(len(header.parts)))
                found = await last.read_manifest()
                assert found is not None
                assert await last.write_manifest(found[0][:-1] + b"?", found[1]) is not None
                assert not await replica.refresh()
                assert not replica.problem
                assert not await replica.refresh()
                assert f"part {len(header.parts)} of the feed is not the one its header names" in replica.problem
                assert replica.applied.generation == 2
                assert await publisher.publish(huge + b"  ")
                assert await replica.refresh()
                assert replica.applied.generation == 4
                assert not replica.problem
                # A publication over what the feed may take is refused whole, before anything is written.
                few = FeedPublisher(store, zone="east", trust_domain="east.mesh", writer="east-b", parts=1)
                await few.start()
                with pytest.raises(ReplicaError, match="more than the 1 a feed may"):
                    await few.publish(huge + b"   ")
                assert few.generation == publisher.generation
            finally:
                replica.close()

    asyncio.run(scenario())


@asynccontextmanager
async def feed_stores(platform: Platform, tmp_path: Path) -> AsyncIterator[tuple[ReplicaStore, ReplicaStore]]:
    """Two clients of one new feed, with its further parts removed at the end."""
    async with replica_store(platform, tmp_path) as (store, other):
        try:
            yield store, other
        finally:
            if isinstance(store, SecretStore):  # Consul KV: the prefix is removed whole
                api = KubernetesApi(KubernetesSettings(kubeconfig=str(platform.account.kubeconfig)))  # type: ignore[union-attr]
                await api.connect()
                try:
                    for number in range(1, MAX_PARTS):
                        with contextlib.suppress(NotFoundError):
                            await api.request(api.delete_call("secrets", store.namespace, f"{store.name}-{number}"))
                finally:
                    await api.aclose()


def test_a_feed_over_what_one_object_of_the_store_holds_is_refused_unread() -> None:
    # A store configured to hold more than its default (Consul's kv_max_value_size raised, say) still
    # cannot hand a replica more than the store's default allows.
    stored = encode_feed(_header(b"{}"), b"{}")[0] + b"x" * 1000
    with pytest.raises(ReplicaError, match="more than the store holds in one object"):
        decode_feed(stored, "Secret meshfed/east-gateway", largest=len(stored) - 1)


def _assert_store_holds_generation(found: tuple[bytes, str] | None, generation: int) -> None:
    assert found is not None
    line = found[0].split(b"\n")[1]
    assert orjson.loads(line)["generation"] == generation


def test_a_replica_says_when_its_svid_nears_its_end_without_a_renewal(platform: Platform, tmp_path: Path) -> None:
    zone = Zone.init(tmp_path / "east", "east", "east.mesh")
    clock = ManualClock()  # SVIDs are stamped by the real clock: the manual one starts there

    def config_with(ttl: dt.timedelta) -> bytes:
        svid = zone.authority.issue_svid(zone.trust_domain.gateway_id, ttl)
        identity = Identity(
            cert_chain_pem=svid.cert_chain_pem().decode(), private_key_pem=svid.private_key_pem().decode()
        )
        return _config("a.example").model_copy(update={"identity": identity}).to_json()

    async def scenario() -> None:
        async with replica_store(platform, tmp_path) as (leader_store, replica_side):
            publisher = FeedPublisher(leader_store, zone="east", trust_domain="east.mesh", writer="east-a")
            await publisher.start()
            assert await publisher.publish(config_with(dt.timedelta(hours=1)))
            replica = GatewayReplica(FeedReader(replica_side), clock=clock)
            try:
                assert await replica.refresh()
                assert replica.readiness() == (200, {**replica.readiness()[1], "status": "ready", "problems": []})
                metrics = replica.metrics().decode()
                assert "meshfed_gateway_replica_config_generation" in metrics
                assert "meshfed_gateway_replica_svid_expiry" in metrics
                # The leader renews at half-life: at three quarters with no renewal, it is worth saying.
                clock.advance(dt.timedelta(minutes=44).total_seconds())
                assert replica.readiness()[1]["status"] == "ready"
                clock.advance(dt.timedelta(minutes=2).total_seconds())
                code, body = replica.readiness()
                assert (code, body["status"]) == (200, "degraded")
                (problem,) = body["problems"]
                assert "no renewal has come" in problem
                assert leader_store.where in problem
                clock.advance(dt.timedelta(minutes=15).total_seconds())
                (problem,) = replica.readiness()[1]["problems"]
                assert "expired at" in problem
                # A renewal published: the replica serves it, and has nothing to say.
                assert await publisher.publish(config_with(dt.timedelta(hours=3)))
                assert await replica.refresh()
                assert replica.readiness()[1] == {**replica.readiness()[1], "status": "ready", "problems": []}
            finally:
                replica.close()

    asyncio.run(scenario())
