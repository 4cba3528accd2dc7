"""A peer can never break a zone (issue 11): hostile peers against a zone run as `meshfed up` runs it.

Each scenario runs the target zone ``east`` assembled for real (controller,
Rust gateway, peering, rotation), an honest zone ``west`` peered with it and
exporting ``web``, and, where the scenario needs one, a hostile zone that
peers for real and then speaks the stream protocol by hand
(:class:`tests.hostile_peer.HostilePeer`). Whatever the hostile peer sends is
refused with a NACK naming the field or limit, shown in the target's status,
and changes nothing else: the honest peer's new exports still arrive, and the
target restarts cleanly on its directory, still serving the honest imports.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from meshfed.errors import PeeringError
from meshfed.federation._proto import peering_pb2 as pb
from meshfed.federation._proto import peering_pb2_grpc as pb_grpc
from meshfed.federation.dialer import establish
from meshfed.federation.exchange import ExportedService, ServiceSnapshot
from meshfed.federation.gateway_config import INGRESS_LISTENER
from meshfed.federation.identity import federation_host
from meshfed.federation.imports import ImportStore, egress_listener_name
from meshfed.federation.link import PeerLimits
from meshfed.federation.peering_state import Peering
from meshfed.federation.peering_store import PeeringStore, request_delete
from meshfed.federation.token import PeeringToken, decode_token, new_secret
from meshfed.runtime import ZoneSettings
from meshfed.supervisor import ComponentStatus
from meshfed.trust.bundle import TrustBundle, parse_bundle
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import STATE_FILE
from tests.conftest import ZoneFactory, eventually, free_port
from tests.hostile_peer import (
    LOOPBACK,
    SOME_GATEWAY,
    HostilePeer,
    RunningZone,
    delta,
    egress,
    export,
    forged_identity,
    service,
    snapshot,
)
from tests.test_e2e_federation import call as call_listener


def run(coroutine: Coroutine[Any, Any, None], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(coroutine, timeout))


@dataclass
class Federation:
    east: RunningZone  # the zone under test
    west: RunningZone  # an honest peer (it dials east), exporting web to east
    hostile: HostilePeer | None

    @property
    def evil(self) -> HostilePeer:
        assert self.hostile is not None
        return self.hostile


@contextlib.asynccontextmanager
async def federation(
    make_zone: ZoneFactory,
    *,
    hostile: str | None = "evil",
    east_settings: ZoneSettings = LOOPBACK,
    west_settings: ZoneSettings = LOOPBACK,
    hello: Mapping[str, Any] | None = None,
    **east_overrides: Any,
) -> AsyncIterator[Federation]:
    """east running, west peered with it (west dials) and exporting web, and a hostile peer connected to east.

    ``east_overrides`` set attributes of east's peering service before it starts; ``hello`` is what the
    hostile peer says in its Hello.
    """
    target = RunningZone(make_zone("east"), east_settings)
    honest = RunningZone(make_zone("west"), west_settings)
    export(honest.zone, "web", "east")
    peer: HostilePeer | None = None
    try:
        await target.start(**east_overrides)
        await honest.start()
        await honest.peering.establish(target.peering.issue_token("west").encoded, "east")
        await eventually(lambda: target.has_import("web", "west"), "east imports west's web")
        if hostile is not None:
            peer = HostilePeer(make_zone(hostile), target)
            await peer.establish()
            await peer.connect(**(hello or {}))
            await eventually(lambda: target.state(hostile) == "ACTIVE", f"east sees {hostile} ACTIVE")
        yield Federation(target, honest, peer)
    finally:
        if peer is not None:
            await peer.close()
        await honest.stop()
        await target.stop()


async def honest_peer_unaffected(fed: Federation, new_service: str) -> None:
    """west's export made after the attack reaches east; east restarts on its directory and still serves west."""
    east = fed.east
    export(fed.west.zone, new_service, "east")
    await eventually(lambda: east.has_import(new_service, "west"), f"east's egress listener for west's {new_service}")
    assert east.status("west").import_error == ""
    await east.restart()
    # Served from the stored imports at once, before west has even reconnected.
    assert {egress("web", "west"), egress(new_service, "west")} <= east.listeners()
    await eventually(lambda: east.state("west") == "ACTIVE", "west reconnects to the restarted east")
    assert east.status("west").import_error == ""


# -- 1. malformed updates ------------------------------------------------------------------------------------------

MALFORMED = [
    ("not an address", snapshot(2, [service("ok")], addresses=["not-an-address"]), "snapshot.gateway_addresses[0]"),
    ("port 70000 in an address", snapshot(2, [service("ok")], addresses=["1.2.3.4:70000"]), "gateway_addresses[0]"),
    ("port 0 in an address", snapshot(2, [service("ok")], addresses=["1.2.3.4:0"]), "gateway_addresses[0]"),
    ("17 addresses", snapshot(2, [service("ok")], addresses=[f"10.0.0.{i}:443" for i in range(17)]), "at most 16"),
    ("uppercase name", snapshot(2, [service("Web")]), "snapshot.services[0].name"),
    ("64-character name", snapshot(2, [service("a" * 64)]), "snapshot.services[0].name"),
    ("name with a slash", snapshot(2, [service("a/b")]), "snapshot.services[0].name"),
    ("namespace with a dot", snapshot(2, [service("ok", namespace="a.b")]), "snapshot.services[0].namespace"),
    ("port 0", snapshot(2, [service("ok", {"http": 0})]), "snapshot.services[0].ports.http"),
    ("port 70000", snapshot(2, [service("ok", {"http": 70000})]), "snapshot.services[0].ports.http"),
    (
        "port name not a DNS label",
        snapshot(2, [service("ok", {"Bad_Port": 80})]),
        "snapshot.services[0].ports.Bad_Port",
    ),
    ("version 2^64-1", snapshot(2**64 - 1, [service("ok")]), "snapshot.version"),
    ("version 2^63", snapshot(2**63, [service("ok")]), "snapshot.version"),
    ("duplicate services", snapshot(2, [service("dup"), service("dup", {"grpc": 9090})]), "snapshot.services"),
    ("healthy > total", snapshot(2, [service("ok", healthy=3, total=2)]), "healthy_endpoints 3 exceeds"),
    ("a long epoch", snapshot(2, [service("ok")], epoch="e" * 65), "snapshot.epoch"),
    ("a 100,000-character name", snapshot(2, [service("x" * 100_000)]), "snapshot.services[0].name"),
    ("a 100,000-character port name", snapshot(2, [service("ok", {"p" * 100_000: 80})]), "services[0].ports.ppp"),
    ("a delta upserting a bad service", delta(1, 2, [service("Bad")]), "delta.upserted[0].name"),
    ("a delta with a bad address", delta(1, 2, [service("ok2")], addresses=["x:y"]), "delta.gateway_addresses[0]"),
]


def test_malformed_updates_are_refused_naming_the_field_and_change_nothing(make_zone):
    async def scenario() -> None:
        async with federation(make_zone) as fed:
            east, evil = fed.east, fed.evil
            ack = await evil.update(snapshot(1, [service("ok")]))
            assert (ack.version, ack.epoch, ack.error) == (1, "e1", "")
            await eventually(lambda: east.has_import("ok", "evil", "http"), "east serves evil's valid v1")
            served = east.listeners()

            for what, message, field in MALFORMED:
                ack = await evil.update(message)
                assert field in ack.error, f"{what}: {ack.error!r}"
                # A NACK says what the receiver still serves.
                assert (ack.version, ack.epoch) == (1, "e1"), what
                status = east.status("evil")
                assert status.import_error == ack.error, what
                assert status.received_version == 1, what
                assert east.listeners() == served, what
                assert len(ack.error) < 512, what  # bounded, whatever the peer sent

            # Nothing refused was stored: the stored imports are still v1.
            with PeeringStore.of(east.zone) as store:
                row = store.require("evil", snapshots=True)
            assert row.received_version == 1
            assert row.received_snapshot is not None
            assert [s.name for s in row.received_snapshot.services] == ["ok"]
            assert row.refused_reason == ack.error

            # The stream carried on: the next valid update applies and clears the error.
            ack = await evil.update(delta(1, 5, [service("fine")]))
            assert (ack.version, ack.error) == (5, "")
            await eventually(lambda: east.has_import("fine", "evil", "http"), "east serves evil's valid v5")
            assert east.status("evil").import_error == ""
            ack = await evil.update(snapshot(6, [service("Bad")]))
            assert "services[0].name" in ack.error

            await honest_peer_unaffected(fed, "late")
            # The refusal survives the restart, and so do evil's last good imports.
            assert "services[0].name" in east.status("evil").import_error
            assert east.has_import("fine", "evil", "http")

    run(scenario())


def test_numbers_out_of_range_outside_updates_do_not_break_the_stream(make_zone):
    """uint64 fields the target stores (bundle sequences) or compares (acked versions) at their maximum."""

    async def scenario() -> None:
        huge = 2**64 - 1
        async with federation(make_zone, hello={"bundle_sequence": huge, "last_acked_version": huge}) as fed:
            east, evil = fed.east, fed.evil
            await evil.send(pb.PeerMessage(heartbeat=pb.Heartbeat(sent_at_unix_ms=2**63 - 1, bundle_sequence=huge)))
            await evil.send(pb.PeerMessage(ack=pb.Ack(version=huge, epoch="no-such-epoch")))
            # Still the same stream, still applying updates.
            ack = await evil.update(snapshot(1, [service("ok")]))
            assert (ack.version, ack.error) == (1, "")
            await eventually(lambda: east.has_import("ok", "evil", "http"), "east serves evil's v1")
            assert not evil.ended.is_set()
            assert east.status("evil").connected
            assert stored(east, "evil").peer_bundle_sequence == 2**63 - 1  # capped to what SQLite holds
            assert east.runtime.controller.problems() == []
            await honest_peer_unaffected(fed, "late")

    run(scenario())


def test_imports_the_data_plane_rejects_are_left_out_for_that_peer_only(make_zone):
    """Valid names that add up to a TLS server name longer than 253 characters: the Rust config refuses it."""
    long_domain = ".".join(["a" * 60, "b" * 60, "c" * 60, "mesh"])

    async def scenario() -> None:
        async with federation(make_zone, hostile=None) as fed:
            east = fed.east
            evil = HostilePeer(None, east, forged=forged_identity("evil", long_domain))
            await evil.establish()
            await evil.connect()
            assert (await evil.update(snapshot(1, [service("ok")]))).error == ""
            await eventually(lambda: east.has_import("ok", "evil", "http"), "east serves evil's v1")

            longest = service("x" * 63, namespace="y" * 63)
            ack = await evil.update(snapshot(2, [service("ok"), longest]))
            assert "the data plane rejects them" in ack.error, ack.error
            assert "sni" in ack.error
            assert (ack.version, ack.epoch) == (1, "e1")
            assert "the data plane rejects them" in east.status("evil").import_error
            # evil's previous imports were put back and are served; so are west's.
            assert east.has_import("ok", "evil", "http")
            assert east.has_import("web", "west")
            with ImportStore(east.zone.directory) as imports:
                assert imports.snapshots()["evil"].version == 1
            await honest_peer_unaffected(fed, "late")
            assert east.has_import("ok", "evil", "http")
            await evil.close()

    run(scenario())


def test_a_trust_domain_the_data_plane_cannot_hold_is_refused_at_establishment(make_zone):
    """SPIFFE caps a trust domain at 255 characters, and so does the Rust gateway: a longer one must never
    reach the zone's trust bundles, where it would make every gateway config of the zone invalid."""
    too_long = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 63, "mesh"])
    assert len(too_long) > 255

    async def scenario() -> None:
        async with federation(make_zone, hostile=None) as fed:
            east = fed.east
            evil = HostilePeer(None, east, forged=forged_identity("evil", too_long))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await evil.establish()
            assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION, refused.value
            assert "SPIFFE allows at most 255" in (refused.value.details() or ""), refused.value.details()
            assert too_long not in trusted_domains(east)
            assert east.state("evil") == "PENDING"
            # Nor when east redeems a token that such a zone made: refused before anything is sent.
            forged = forged_identity("evil", too_long)
            token = PeeringToken(
                peer_name="east",
                zone="evil",
                trust_domain=too_long,
                addresses=[SOME_GATEWAY],
                ca_bundle=forged.bundle.to_spiffe_json().decode(),
                secret=new_secret(),
                expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5),
            )
            with pytest.raises(PeeringError, match="SPIFFE allows at most 255"):
                await east.peering.establish(token.encode(), "evil-zone")
            assert too_long not in trusted_domains(east)
            assert east.runtime.controller.problems() == []
            await honest_peer_unaffected(fed, "late")

    run(scenario())


# -- 2. an honest peer advertising a DNS name ------------------------------------------------------------------------


def test_a_peer_advertising_its_gateway_by_dns_name_is_reached_through_its_address(make_zone, echo_server):
    port = free_port()
    west_settings = replace(
        LOOPBACK,
        controller=replace(
            LOOPBACK.controller, gateway_address=f"127.0.0.1:{port}", gateway_advertise=(f"localhost:{port}",)
        ),
    )

    async def scenario() -> None:
        async with federation(make_zone, hostile=None, west_settings=west_settings) as fed:
            east = fed.east
            export(fed.west.zone, "echo", "east", endpoint=echo_server.address)
            await eventually(lambda: east.has_import("echo", "west"), "east's egress for west's echo")
            assert east.status("west").import_error == ""
            assert east.runtime.controller.problems() == []
            # east stores what west said, and dials the address it resolves to.
            with ImportStore(east.zone.directory) as imports:
                assert imports.snapshots()["west"].gateway_addresses == [f"localhost:{port}"]
            config = east.runtime.controller.gateway_config()
            (cluster,) = [c for c in config.clusters if c.name == egress("echo", "west")]
            addresses = [endpoint.address for endpoint in cluster.endpoints]
            assert f"127.0.0.1:{port}" in addresses
            assert all(address.endswith(f":{port}") for address in addresses)
            # And traffic goes through: east's egress, west's gateway (mTLS), the echo server.
            assert await call(east, egress("echo", "west"), b"by name") == b"by name"
            await honest_peer_unaffected(fed, "late")
            assert await call(east, egress("echo", "west"), b"after restart") == b"after restart"

    run(scenario())
    assert bytes(echo_server.received) == b"by nameafter restart"


# -- 3. per-peer limits ------------------------------------------------------------------------------------------


def test_a_peer_over_its_limits_is_refused_naming_the_limit_and_under_them_applied(make_zone):
    limited = replace(LOOPBACK, peering=replace(LOOPBACK.peering, limits=PeerLimits(max_services=20, max_listeners=20)))

    async def scenario() -> None:
        async with federation(make_zone, east_settings=limited) as fed:
            east, evil = fed.east, fed.evil
            one_port = [service(f"s{i}") for i in range(21)]
            ack = await evil.update(snapshot(1, one_port))
            assert "21 services" in ack.error, ack.error
            assert "max_services" in ack.error, ack.error
            assert (ack.version, ack.epoch) == (0, "")
            assert "max_services" in east.status("evil").import_error

            three_ports = [service(f"s{i}", {"a": 1, "b": 2, "c": 3}) for i in range(10)]
            ack = await evil.update(snapshot(2, three_ports))
            assert "30 egress listeners" in ack.error, ack.error
            assert "max_listeners" in ack.error, ack.error
            assert not any(".evil:" in name for name in east.listeners())

            two_ports = [service(f"s{i}", {"a": 1, "b": 2}) for i in range(10)]
            ack = await evil.update(snapshot(3, two_ports))
            assert (ack.version, ack.error) == (3, "")
            await eventually(
                lambda: sum(".evil:" in name for name in east.listeners()) == 20, "evil's 20 egress listeners"
            )
            assert east.status("evil").import_error == ""

            # A delta that would take it over the limit is refused the same way.
            ack = await evil.update(delta(3, 4, [service("one-more")]))
            assert "21 egress listeners" in ack.error, ack.error
            assert "max_listeners" in ack.error, ack.error
            assert ack.version == 3
            assert sum(".evil:" in name for name in east.listeners()) == 20
            await honest_peer_unaffected(fed, "late")
            assert sum(".evil:" in name for name in east.listeners()) == 20

    run(scenario())


def test_a_peer_renaming_its_services_cannot_use_up_the_egress_ports(make_zone):
    """Egress ports kept from a base (`--egress-port-base`, 15500 by default) stay with their listener across
    restarts. A peer that renames all its services on every update must not use the range up for every
    peer: the ports of imports that are gone are reused once the range is full.

    Run at the store (what each gateway config build does with it) rather than on bound sockets: the test
    needs the top of the port range, and the suite binds ephemeral ports only.
    """
    zone = make_zone("east")
    base = 65535 - 29  # room for 30 listeners

    def build(imports: ImportStore) -> dict[str, int]:
        ports = imports.egress_ports(base)
        assigned = {
            egress_listener_name(item, port): ports(egress_listener_name(item, port))
            for item in imports.services()
            for port in item.service.ports
        }
        ports.save()
        return assigned

    def exports(peer: str, version: int, names: list[str]) -> ServiceSnapshot:
        return ServiceSnapshot(
            zone=peer,
            trust_domain=f"{peer}.mesh",
            gateway_addresses=[SOME_GATEWAY],
            version=version,
            services=[
                ExportedService(name=n, namespace="default", ports={"tcp": 7}, healthy_endpoints=1, total_endpoints=1)
                for n in names
            ],
        )

    with ImportStore(zone.directory) as imports:
        imports.put("west", exports("west", 1, ["web"]))
        web = build(imports)[egress("web", "west")]
        for round_ in range(5):  # 100 listener names in all, in a range of 30
            imports.put("evil", exports("evil", round_ + 1, [f"r{round_}-{i}" for i in range(20)]))
            assigned = build(imports)
            assert len(assigned) == 21
            assert len(set(assigned.values())) == 21, "two listeners share a port"
            assert assigned[egress("web", "west")] == web, "a live listener lost its port"
        imports.put("west", exports("west", 2, ["web", "late"]))
        assigned = build(imports)
        assert assigned[egress("web", "west")] == web
        assert egress("late", "west") in assigned
    # The same ports after a restart (a new store on the same file).
    with ImportStore(zone.directory) as imports:
        assert build(imports) == assigned


# -- 4. the largest version, then delete -----------------------------------------------------------------------------


def test_the_largest_version_is_accepted_and_the_peering_still_deletes_cleanly(make_zone, caplog):
    top = 2**63 - 1

    async def scenario() -> None:
        async with federation(make_zone) as fed:
            east, evil = fed.east, fed.evil
            controller = east.runtime.controller
            ack = await evil.update(snapshot(top, [service("ok")]))
            assert (ack.version, ack.error) == (top, "")
            await eventually(lambda: east.has_import("ok", "evil", "http"), "east serves evil's top version")
            ack = await evil.update(snapshot(top, [service("other")]))  # the same version again: a replay
            assert (ack.version, ack.error) == (top, "")

            # `meshfed peer delete evil` on the running zone: the row is marked; the poll tears it down.
            with PeeringStore.of(east.zone) as store:
                request_delete(store, "evil")
            await eventually(lambda: "evil" not in {p.name for p in east.peering.peers()}, "east forgets evil")
            await eventually(evil.ended.is_set, "evil's stream ends")
            assert "terminate" in evil.kinds()
            await eventually(lambda: not east.has_import("ok", "evil", "http"), "evil's imports withdrawn")
            await eventually(lambda: "evil.mesh" not in trusted_domains(east), "east forgets evil.mesh")
            poll = component(east, "peering-poll")
            assert (poll.state, poll.restarts, poll.last_error) == ("running", 0, "")
            # Withdrawn before the trust went: no config was ever built with imports it cannot verify.
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert not [m for m in errors if "rejects them" in m or "crashed" in m], errors
            assert controller.problems() == []

            # The peer ending it itself, at the top version, is torn down as cleanly.
            other = HostilePeer(make_zone("other"), east)
            await other.establish()
            await other.connect()
            assert (await other.update(snapshot(top, [service("ok")]))).version == top
            await eventually(lambda: east.has_import("ok", "other", "http"), "east serves other's top version")
            await other.send(pb.PeerMessage(terminate=pb.Terminate(reason="bye")))
            await eventually(lambda: east.state("other") == "TERMINATED", "east tears other down")
            await eventually(lambda: not east.has_import("ok", "other", "http"), "other's imports withdrawn")
            await other.close()

            # The poll still runs: a new peering is established and picked up.
            south = HostilePeer(make_zone("south"), east)
            await south.establish()
            await south.connect()
            await eventually(lambda: east.state("south") == "ACTIVE", "east sees the new peering ACTIVE")
            assert component(east, "peering-poll").restarts == 0
            assert controller.problems() == []
            await south.close()
            await honest_peer_unaffected(fed, "late")

    run(scenario())


# -- 5. an exporter restored from an older backup ------------------------------------------------------------------


def test_an_exporter_restored_from_backup_is_followed_to_its_current_exports(make_zone, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="meshfed.federation.service")

    def exported_by_west(east: RunningZone) -> set[str]:
        return {name for name in ("web", "b", "c", "d") if east.has_import(name, "west")}

    async def scenario() -> None:
        async with federation(make_zone, hostile=None) as fed:
            east, west = fed.east, fed.west
            await eventually(lambda: west.status("east").acked_version == west.status("east").sent_version, "v1 acked")
            backup = tmp_path / "west-state.db"
            copy_database(west.zone.directory / STATE_FILE, backup)  # a backup of the running zone
            for name in ("b", "c"):
                export(west.zone, name, "east")
                await eventually(functools.partial(east.has_import, name, "west"), f"east imports {name}")
            claimed = east.status("west").received_version

            await west.stop()
            copy_database(backup, west.zone.directory / STATE_FILE)  # restore: west forgets b, c and its versions
            with PeeringStore.of(west.zone) as store:
                assert store.require("east").sent_version < claimed
            export(west.zone, "d", "east")  # the operator changes the exports before starting again
            await west.start()

            await eventually(lambda: exported_by_west(east) == {"web", "d"}, "east follows west's current exports")
            await eventually(lambda: west.status("east").export_error == "" and east.state("west") == "ACTIVE")
            status, sent = east.status("west"), west.status("east").sent_version
            # No livelock: after a few more heartbeats nothing more was sent or applied.
            seen = status.last_heartbeat_received_at
            assert seen is not None
            await eventually(
                lambda: (east.status("west").last_heartbeat_received_at or seen) > seen + dt.timedelta(seconds=1),
                "a second of heartbeats",
            )
            after = east.status("west")
            assert (after.received_version, after.import_error) == (status.received_version, "")
            assert west.status("east").sent_version == sent
            assert exported_by_west(east) == {"web", "d"}
            restarts = [r for r in caplog.records if "restored from an older backup" in r.getMessage()]
            assert len(restarts) == 1, [r.getMessage() for r in restarts]
            taken = [r for r in caplog.records if "started a new export epoch" in r.getMessage()]
            assert len(taken) == 1, [r.getMessage() for r in taken]
            await honest_peer_unaffected(fed, "late")
            assert exported_by_west(east) == {"web", "d"}

    run(scenario())


# -- 6. concurrent replays of tokens ---------------------------------------------------------------------------------


def test_concurrent_token_replays_establish_at_most_one_peering_per_token_and_leave_no_orphan_trust(make_zone):
    async def scenario() -> None:
        async with federation(make_zone, hostile=None) as fed:
            east = fed.east
            tokens = [decode_token(east.peering.issue_token(f"p{i}").encoded) for i in range(3)]
            dialers = [make_zone(f"d{j}") for j in range(40)]
            roots = east.zone.trust.own_bundle().to_pem()
            options = [("grpc.ssl_target_name_override", federation_host(east.zone.trust_domain))]
            address = east.peering.establish_addresses[0]
            async with grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(roots), options=options) as ch:
                stub = pb_grpc.PeeringEstablishmentStub(ch)  # type: ignore[no-untyped-call]

                async def redeem(j: int) -> bool:
                    token, dialer = tokens[j % 3], dialers[j]
                    request = pb.EstablishRequest(
                        secret=token.secret,
                        peer_name=token.peer_name,
                        zone=token.peer_name,
                        trust_domain=str(dialer.trust_domain),
                        bundle=dialer.trust.own_bundle().to_spiffe_json(),
                        stream_addresses=["127.0.0.1:9"],
                    )
                    try:
                        await stub.Establish(request, timeout=10)
                    except grpc.aio.AioRpcError as err:
                        refusals.append(err)
                        return False
                    return True

                refusals: list[grpc.aio.AioRpcError] = []
                results = await asyncio.gather(*(redeem(j) for j in range(40)))
            assert sum(results) == 3, results
            # The others were refused as replays of a spent token.
            assert {err.code() for err in refusals} == {grpc.StatusCode.PERMISSION_DENIED}
            assert all("used" in (err.details() or "") for err in refusals), [err.details() for err in refusals]
            peerings = {p.name: p for p in east.peering.peers()}
            owned = {p.peer_trust_domain for p in peerings.values() if p.peer_trust_domain}
            assert trusted_domains(east) - {"east.mesh"} <= owned, "trust without a peering owning it"
            assert trusted_domains(east) - {"east.mesh"} == owned
            for i in range(3):
                assert peerings[f"p{i}"].peer_trust_domain is not None
            await honest_peer_unaffected(fed, "late")

    run(scenario())


# -- 7. trust an operator imported -------------------------------------------------------------------------------


def test_a_peering_never_replaces_or_removes_trust_an_operator_imported(make_zone):
    async def scenario() -> None:
        async with federation(make_zone) as fed:
            east, evil = fed.east, fed.evil
            xray = make_zone("xray")
            operator_bundle = parse_bundle(xray.trust_domain, xray.trust.own_bundle().to_spiffe_json())
            east.zone.trust.import_bundle(operator_bundle, "import")  # `meshfed trust import`

            # east redeems xray's token: refused before anything is sent (establish), naming the source.
            with PeeringStore.of(xray) as store:
                xray_token = store.issue_token(xray, "east", ["127.0.0.1:9"]).encoded
            with pytest.raises(PeeringError, match="because an operator imported its bundle"):
                await east.peering.establish(xray_token, "xray")
            assert "xray" not in {p.name for p in east.peering.peers()}
            # xray redeems east's token: east refuses (accept), naming the source.
            token = east.peering.issue_token("xray").encoded
            with pytest.raises(PeeringError, match="because an operator imported its bundle"):
                await establish(xray, token, "east-zone", stream_addresses=[])
            assert east.state("xray") == "PENDING"
            assert held(east, "xray.mesh") == ("import", operator_bundle)
            await east.peering.delete("xray")
            assert held(east, "xray.mesh") == ("import", operator_bundle)

            # An operator takes over the trust of a live peer: the peer's bundle updates cannot replace
            # it, and deleting the peering does not remove it.
            evil_zone = evil.zone
            assert evil_zone is not None
            evil_bundle = parse_bundle(evil_zone.trust_domain, evil_zone.trust.own_bundle().to_spiffe_json())
            east.zone.trust.import_bundle(evil_bundle, "import")
            evil_zone.authority.rotate()
            await evil.send(
                pb.PeerMessage(bundle=pb.BundleUpdate(bundle=evil_zone.trust.own_bundle().to_spiffe_json()))
            )
            assert (await evil.update(snapshot(1, [service("ok")]))).error == ""  # the bundle was read before it
            assert held(east, "evil.mesh") == ("import", evil_bundle)
            await east.peering.delete("evil")
            assert held(east, "evil.mesh") == ("import", evil_bundle)
            assert held(east, "xray.mesh") == ("import", operator_bundle)
            await honest_peer_unaffected(fed, "late")
            assert held(east, "evil.mesh") == ("import", evil_bundle)

    run(scenario())


# -- 8. a peer announcing an endless heartbeat interval ------------------------------------------------------------


def test_a_silent_peer_announcing_an_endless_heartbeat_interval_fails_within_the_clamped_deadline(make_zone):
    async def scenario() -> None:
        bounded = replace(LOOPBACK, peering=replace(LOOPBACK.peering, peer_heartbeat_bounds=(0.05, 0.5)))
        async with federation(make_zone, hostile=None, east_settings=bounded) as fed:
            east = fed.east
            evil = HostilePeer(make_zone("evil"), east)
            await evil.establish()
            await evil.connect(heartbeat_interval_ms=4294967295)
            said_hello = time.monotonic()
            await eventually(lambda: east.state("evil") == "ACTIVE", "evil ACTIVE")
            assert east.status("evil").peer_heartbeat_seconds == 0.5
            # Silent from now on, with the stream kept open.
            deadline = 0.5 * east.peering.settings.missed_heartbeats
            await eventually(lambda: east.state("evil") == "FAILING", "evil FAILING", timeout=deadline + 2)
            # The clamped interval, not the announced one (nor the lower bound), set the deadline.
            assert deadline - 0.25 < time.monotonic() - said_hello < deadline + 1.0
            assert "no message for" in east.status("evil").state_reason
            assert east.state("west") == "ACTIVE"  # west's heartbeats (0.2 s) are within the bounds
            assert east.status("west").peer_heartbeat_seconds == pytest.approx(0.2)
            await evil.close()
            await honest_peer_unaffected(fed, "late")

    run(scenario())


# -- 9. stream loss --------------------------------------------------------------------------------------------------


def test_a_lost_stream_shows_disconnected_at_once_and_active_again_on_reconnect(make_zone):
    async def scenario() -> None:
        async with federation(make_zone) as fed:  # evil announces 60 s heartbeats: FAILING only after 3 minutes
            east, evil = fed.east, fed.evil
            assert east.status("evil").peer_heartbeat_seconds == 60
            await evil.close()  # the connection drops without a word
            took = await eventually(lambda: east.state("evil") == "DISCONNECTED", "evil DISCONNECTED", timeout=3)
            status = east.status("evil")
            assert status.state_reason, status
            assert not status.connected
            print(f"stream loss shown after {took:.2f}s (failure deadline 180 s): {status.state_reason}")

            await evil.connect()
            await eventually(lambda: east.state("evil") == "ACTIVE", "evil ACTIVE again")
            assert east.status("evil").state_reason == ""
            # A peer that closes its side cleanly is shown the same way.
            await evil.half_close()
            await eventually(lambda: east.state("evil") == "DISCONNECTED", "evil DISCONNECTED", timeout=5)
            assert "closed the stream" in east.status("evil").state_reason
            await evil.close()
            await evil.connect()
            await eventually(lambda: east.state("evil") == "ACTIVE", "evil ACTIVE again")
            await honest_peer_unaffected(fed, "late")

    run(scenario())


# -- 10. rotation while a peer is away -------------------------------------------------------------------------------


def test_a_peer_offline_through_a_rotation_reconnects_and_then_gets_the_new_ca(make_zone):
    overlap = dt.timedelta(minutes=15)

    async def scenario() -> None:
        async with federation(make_zone, hostile=None) as fed:
            east, west = fed.east, fed.west
            await eventually(lambda: stored(east, "west").peer_bundle_sequence == 1, "west confirms east's bundle")
            old_intermediate = east.peering._server._svid.intermediates[0] if east.peering._server._svid else None
            await west.stop()
            await eventually(lambda: east.state("west") != "ACTIVE", "east sees west go")

            # The whole overlap passes while west is away: the new CA is active when it comes back.
            t0 = dt.datetime.now(dt.UTC)
            east.zone.authority.rotate(overlap=overlap, now=t0)
            east.zone.authority.advance(now=t0 + overlap)
            new = next(g for g in east.zone.authority.generations() if g.state == "active")
            assert new.generation == 1
            assert east.zone.trust.own_bundle().sequence == 2
            await eventually(
                lambda: east.peering._server._svid_generation == 0, "east keeps presenting the retiring CA"
            )
            assert east.peering._server._svid is not None
            assert east.peering._server._svid.intermediates[0] == old_intermediate

            await west.start()
            await eventually(lambda: east.state("west") == "ACTIVE", "west reconnects on its own")
            await eventually(lambda: held_sequence(west, "east.mesh") == 2, "west holds east's new bundle")
            await eventually(lambda: east.peering._server._svid_generation == 1, "east presents the new CA")
            assert east.peering._server._svid is not None
            assert east.peering._server._svid.intermediates[0] == east.zone.authority.signing_ca().intermediate
            # A fresh connection verifies east's new-CA SVID.
            await west.stop()
            await eventually(lambda: east.state("west") != "ACTIVE", "east sees west go")
            await west.start()
            await eventually(lambda: east.state("west") == "ACTIVE", "west reconnects to the new CA")
            await eventually(lambda: west.state("east") == "ACTIVE", "west sees east ACTIVE")
            await honest_peer_unaffected(fed, "late")

    run(scenario())


# -- known gap: a failover group shared with a peer that claims another peer's gateway ----------------------------


def test_a_peer_claiming_another_peers_gateway_address_does_not_take_over_its_failover_group(make_zone, echo_server):
    async def scenario() -> None:
        async with federation(make_zone) as fed:
            east, evil, west = fed.east, fed.evil, fed.west
            export(west.zone, "echo", "east", endpoint=echo_server.address)
            await eventually(lambda: east.has_import("echo", "west"), "east imports west's echo")
            assert await call(east, egress("echo", "west"), b"direct") == b"direct"
            host, port = west.runtime.controller.gateway.address(INGRESS_LISTENER)
            ack = await evil.update(snapshot(1, [service("echo", {"tcp": 7})], addresses=[f"{host}:{port}"]))
            assert ack.error == ""
            group = "failover:echo.default:tcp"
            await eventually(lambda: group in east.listeners(), "east's failover group for echo")
            # The direct import of west's echo is untouched...
            assert await call(east, egress("echo", "west"), b"still direct") == b"still direct"
            # ...and the group must still reach west's echo (west's endpoint, with west's pin).
            assert await call(east, group, b"via the group") == b"via the group"

    run(scenario())


# -- 11. a background task that dies ---------------------------------------------------------------------------


def test_a_cancelled_background_task_is_reported_then_restarted(make_zone):
    async def scenario() -> None:
        async with federation(make_zone, hostile=None) as fed:
            east = fed.east
            controller = east.runtime.controller
            name = "meshfed-east-peering-heartbeats"
            transport = httpx.ASGITransport(app=east.runtime.app())
            async with httpx.AsyncClient(transport=transport, base_url="http://east") as api:
                ready = (await api.get("/readyz")).json()
                assert (ready["status"], ready["problems"]) == ("ready", [])
                (shown,) = [c for c in ready["components"] if c["name"] == "peering-heartbeats"]
                assert (shown["state"], shown["ready"], shown["restarts"]) == ("running", True, 0)
                (task,) = [t for t in asyncio.all_tasks() if t.get_name() == name]
                task.cancel()
                await eventually(lambda: any("peering-heartbeats" in p for p in controller.problems()), "reported")
                body = (await api.get("/readyz")).json()
                assert body["status"] == "degraded", body
                (problem,) = body["problems"]
                assert problem.startswith("component peering-heartbeats crashed (cancelled"), problem
                assert "restarting in" in problem
                (shown,) = [c for c in body["components"] if c["name"] == "peering-heartbeats"]
                assert (shown["state"], shown["ready"]) == ("restarting", False)
                await eventually(lambda: controller.problems() == [], "restarted")
                (again,) = [t for t in asyncio.all_tasks() if t.get_name() == name]
                assert again is not task
                assert not again.done()
                assert component(east, "peering-heartbeats").restarts == 1
                again_ready = (await api.get("/readyz")).json()
                assert (again_ready["status"], again_ready["problems"]) == ("ready", [])

            # The restarted watch works: a peer that falls silent is marked FAILING.
            evil = HostilePeer(make_zone("evil"), east)
            await evil.establish()
            await evil.connect(heartbeat_interval_ms=100)
            await eventually(lambda: east.state("evil") == "FAILING", "the restarted watch marks evil FAILING")
            await evil.close()
            await honest_peer_unaffected(fed, "late")

    run(scenario())


# -- helpers ---------------------------------------------------------------------------------------------------------


async def call(zone: RunningZone, listener: str, payload: bytes) -> bytes:
    """``payload`` sent through one of the zone's listeners; what came back (nothing if the connection failed)."""
    return await call_listener(zone.runtime, listener, payload)


def trusted_domains(zone: RunningZone) -> set[str]:
    return {stored.bundle.trust_domain.name for stored in zone.zone.trust.trusted_bundles()}


def held(zone: RunningZone, trust_domain: str) -> tuple[str, TrustBundle] | None:
    stored = next((s for s in zone.zone.trust.trusted_bundles() if s.bundle.trust_domain.name == trust_domain), None)
    return None if stored is None else (stored.source, stored.bundle)


def held_sequence(zone: RunningZone, trust_domain: str) -> int:
    bundle = zone.zone.trust.bundle_of(TrustDomain.parse(trust_domain))
    return 0 if bundle is None else bundle.sequence


def stored(zone: RunningZone, peer: str) -> Peering:
    with PeeringStore.of(zone.zone) as store:
        return store.require(peer)


def component(zone: RunningZone, name: str) -> ComponentStatus:
    (status,) = [s for s in zone.runtime.controller.supervisor.statuses() if s.name == name]
    return status


def copy_database(source: Path, destination: Path) -> None:
    """SQLite's online backup: a consistent copy even while the zone writes."""
    with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(destination)) as dst:
        src.backup(dst)
