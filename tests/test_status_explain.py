"""``meshfed status`` and ``meshfed explain``: the running zone's own account of a service's path.

Two zones run in-process as ``meshfed up`` assembles them; each scenario
breaks one link and checks that ``explain`` names exactly that link first, and
that ``status`` reflects it. The CLI path (api-url discovery, exit codes, JSON)
runs against a real ``meshfed up`` process.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from dataclasses import replace

import orjson

from meshfed.catalog import EmbeddedCatalog, Endpoint, Service
from meshfed.diagnose import explain, zone_status
from meshfed.federation.authz import AuthzRules
from meshfed.federation.exports import ExportRules
from meshfed.policy.authz import RuleSpec
from meshfed.runtime import ZoneRuntime, assemble_zone
from meshfed.zone import Zone
from tests.conftest import EchoServer, eventually, round_trip
from tests.test_cli import meshfed_cli
from tests.test_e2e_federation import LOOPBACK
from tests.test_zone_process import ephemeral_flags, meshfed_up

EGRESS = "egress:echo.default.east:tcp"


def register_echo(zone: Zone, backend: EchoServer, *, healthy: bool = True) -> None:
    with EmbeddedCatalog(zone.directory) as catalog:
        catalog.register(
            Service(
                name="echo",
                ports={"tcp": 7},
                endpoints=[Endpoint(address="127.0.0.1", port=backend.address[1], healthy=healthy)],
            )
        )


def broken(runtime: ZoneRuntime, **kwargs: str) -> str | None:
    report = explain(runtime.controller, runtime.peering, service="echo", **kwargs)
    return report.broken.step if report.broken is not None else None


def test_explain_names_the_first_broken_link_on_each_side(make_zone, echo_server):
    east, west = make_zone("east"), make_zone("west")
    register_echo(east, echo_server)
    settings = replace(
        LOOPBACK,
        controller=replace(
            LOOPBACK.controller, failing_peer_policy="closed", failing_peer_grace=dt.timedelta(seconds=0.3)
        ),
    )

    async def scenario() -> None:
        e, w = assemble_zone(east, settings), assemble_zone(west, settings)
        for runtime in (e, w):
            await runtime.controller.start()
        try:
            await w.peering.establish(e.peering.issue_token("west").encoded, "east")
            await eventually(lambda: w.peering.peer("east").state == "ACTIVE", "peering ACTIVE")

            # Not exported: east says so on its side, west sees no import.
            assert broken(e, peer="west") == "export to west"
            assert broken(w, peer="east") == "import from east"

            with ExportRules(east.directory) as rules:
                rules.add("echo", "default", ["west"])
            await eventually(lambda: broken(w, peer="east") is None, "west's explain to be all ok")
            assert broken(e, peer="west") is None

            # status shows the local address of the import, and it answers.
            (imported,) = zone_status(w.controller, w.peering).imports
            host, port = imported.local_addresses["tcp"].rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                assert round_trip(sock, b"ping") == b"ping"
            assert zone_status(w.controller, w.peering).healthy

            # Authorization: a rule on east denies one caller; explain says which rule.
            with AuthzRules(east.directory) as authz:
                authz.add(RuleSpec(service="echo", action="deny", id="spiffe://west.mesh/ns/x/*"))
            intruder = explain(
                e.controller, e.peering, service="echo", peer="west", caller="spiffe://west.mesh/ns/x/sa/y"
            )
            assert intruder.broken is not None
            assert intruder.broken.step == "authorization of spiffe://west.mesh/ns/x/sa/y"
            assert "rule" in intruder.broken.detail

            # No healthy endpoint: east's side names its endpoints, west's the health at east.
            register_echo(east, echo_server, healthy=False)
            await eventually(lambda: broken(w, peer="east") == "health at east", "west to hear of the lost endpoint")
            assert broken(e, peer="west") == "endpoints"

            # east goes away: west's peering fails, and under the closed policy its egress is withdrawn.
            await e.controller.stop()
            await eventually(lambda: broken(w, peer="east") == "local address", "west's egress withdrawn")
            report = explain(w.controller, w.peering, service="echo", peer="east")
            steps = {step.step: step.ok for step in report.steps}
            assert steps["peering east"] is False
            status = zone_status(w.controller, w.peering)
            assert not status.healthy
            assert any(problem.startswith("peering east:") for problem in status.problems)
        finally:
            for runtime in (w, e):
                await runtime.controller.stop()

    asyncio.run(scenario())


def test_status_and_explain_cli_ask_the_running_zone(tmp_path, echo_server):
    directory = tmp_path / "east"
    meshfed_cli("zone", "init", "--dir", directory, "--name", "east", "--trust-domain", "east.mesh")
    register_echo(Zone.open(directory), echo_server)

    # Not running: one line saying so, exit 1.
    offline = meshfed_cli("status", "--dir", directory)
    assert offline.returncode == 1
    assert b"is not running" in offline.stderr

    with meshfed_up(directory, ephemeral_flags()) as zone:
        zone.wait_serving()
        status = meshfed_cli("status", "--dir", directory, "-o", "json")
        assert status.returncode == 0, status.stderr
        report = orjson.loads(status.stdout)
        assert report["zone"] == "east"
        assert report["healthy"] is True

        explained = meshfed_cli("explain", "echo", "--dir", directory, "--peer", "west")
        assert explained.returncode == 3  # needs attention: not exported, no such peering
        assert b"BROKEN export to west" in explained.stdout
        assert b"fix: meshfed export add" in explained.stdout

        wrong_token = tmp_path / "token"
        wrong_token.write_text("nope")
        refused = meshfed_cli("status", "--dir", directory, "--token-file", wrong_token)
        assert refused.returncode == 1
        assert b"403" in refused.stderr
        assert b"Traceback" not in refused.stderr
        assert zone.stop() == 0
    assert not (directory / "api-url").exists(), "a stopped zone must not leave its API address behind"


def test_a_wildcard_peering_bind_without_advertise_host_warns(make_zone, caplog):
    """Peers would be told 127.0.0.1: the log says so and names the flag that fixes it."""
    zone = make_zone("east")
    settings = replace(
        LOOPBACK, peering=replace(LOOPBACK.peering, listen_address="0.0.0.0:0", establish_address="0.0.0.0:0")
    )

    async def scenario() -> str:
        runtime = assemble_zone(zone, settings)
        await runtime.controller.start()
        try:
            return runtime.peering.issue_token("west").encoded
        finally:
            await runtime.controller.stop()

    with caplog.at_level("WARNING", logger="meshfed.federation.service"):
        asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if "without --advertise-host" in r.getMessage()]
    assert len(warnings) == 2, warnings  # the stream and the token address
    assert "127.0.0.1" in warnings[0]
