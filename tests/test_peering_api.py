"""``/v1/peerings`` over a real peering between two running zones."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI

from meshfed.api.peering import router
from meshfed.federation.peering_state import PeerState
from tests.conftest import eventually
from tests.test_peering import Harness, hello_as_west_signed_by_north, run
from tests.test_trust_name_constraints import make_legacy_root


def api(harness: Harness) -> httpx.AsyncClient:
    app = FastAPI()
    app.include_router(router)
    app.state.peering = harness.service
    app.state.admin_token = harness.zone.admin_token()
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zone")


def test_peering_api_token_establish_show_delete(make_zone):
    east, west = Harness(make_zone("east")), Harness(make_zone("west"))

    async def scenario() -> None:
        await east.start()
        await west.start()
        east_admin = {"Authorization": f"Bearer {east.zone.admin_token()}"}
        west_admin = {"Authorization": f"Bearer {west.zone.admin_token()}"}
        async with api(east) as east_api, api(west) as west_api:
            assert (await east_api.post("/v1/peerings/tokens", json={"peer_name": "west"})).status_code == 401
            wrong = {"Authorization": "Bearer nope"}
            assert (
                await east_api.post("/v1/peerings/tokens", json={"peer_name": "west"}, headers=wrong)
            ).status_code == 403
            issued = await east_api.post("/v1/peerings/tokens", json={"peer_name": "west"}, headers=east_admin)
            assert issued.status_code == 201, issued.text
            assert issued.json()["addresses"] == east.service.establish_addresses

            bad = await west_api.post("/v1/peerings/establish", json={"token": "garbage!"}, headers=west_admin)
            assert bad.status_code == 400
            established = await west_api.post(
                "/v1/peerings/establish", json={"token": issued.json()["token"]}, headers=west_admin
            )
            assert established.status_code == 201, established.text
            assert established.json()["peer_trust_domain"] == "east.mesh"

            await eventually(lambda: west.state_of("east") is PeerState.ACTIVE)
            await eventually(lambda: east.service.peer("west").acked_version >= 1)
            shown = (await east_api.get("/v1/peerings/west", headers=east_admin)).json()
            assert shown["state"] == "ACTIVE"
            assert shown["role"] == "acceptor"
            assert shown["connected"] is True
            listed = (await west_api.get("/v1/peerings", headers=west_admin)).json()
            assert [p["name"] for p in listed] == ["east"]
            assert (await east_api.get("/v1/peerings/nope", headers=east_admin)).status_code == 404

            assert (await west_api.post("/v1/peerings/refresh", headers=west_admin)).status_code == 204
            assert (await west_api.delete("/v1/peerings/east")).status_code == 401
            assert (await west_api.delete("/v1/peerings/east", headers=west_admin)).status_code == 204
            await eventually(lambda: east.state_of("west") is PeerState.TERMINATED)
            assert (await west_api.get("/v1/peerings", headers=west_admin)).json() == []
        await asyncio.gather(west.stop(), east.stop())

    run(scenario())


def test_stream_refuses_an_id_signed_by_another_peers_ca(make_zone):
    """The TLS layer's merged pool lets north's chain through; the per-domain check must not."""
    import grpc

    east = Harness(make_zone("east"))
    west, north = make_zone("west"), make_zone("north")
    # A root without name constraints (an older zone, a SPIRE root): with them, the handshake itself refuses
    # the forged chain (tests/test_trust_name_constraints.py), and this check is never reached.
    make_legacy_root(north)

    async def scenario() -> None:
        await east.start()
        try:
            refused = await hello_as_west_signed_by_north(east, west, north)
            assert isinstance(refused, grpc.aio.AioRpcError)
            assert refused.code() is grpc.StatusCode.UNAUTHENTICATED
            assert "west.mesh" in (refused.details() or "")
            assert east.state_of("west") is PeerState.ESTABLISHING
        finally:
            await east.stop()

    run(scenario())
