"""The trust routes of the zone API: open reads, admin-only changes, no key material in any response."""

from __future__ import annotations

import json
from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.testclient import TestClient

from meshfed.api.trust import router
from tests.test_trust_cli import _assert_no_secrets


def _client(zone) -> TestClient:
    # The router reads only `app.state.controller.zone` (and the admin token): a zone without a running
    # controller is enough, and keeps these tests off the gateway.
    app = FastAPI()
    app.include_router(router)
    app.state.controller = SimpleNamespace(zone=zone, ready=False)
    app.state.admin_token = zone.admin_token()
    return TestClient(app)


def test_bundle_and_listing_are_open_and_carry_no_key(make_zone):
    east = make_zone("east")
    client = _client(east)
    bundle = client.get("/v1/trust/bundle")
    assert bundle.status_code == 200
    assert bundle.headers["content-type"] == "application/json"
    assert bundle.content == east.trust.own_bundle().to_spiffe_json()
    assert client.get("/v1/trust/bundles").status_code == 401  # what the zone trusts is topology: a token
    listing = client.get("/v1/trust/bundles", headers={"Authorization": f"Bearer {east.admin_token()}"})
    assert listing.status_code == 200
    assert listing.json()["trust_domains"][0]["trust_domain"] == "east.mesh"
    _assert_no_secrets(east, bundle.content, listing.content)


def test_changes_need_the_admin_token(make_zone):
    east, west = make_zone("east"), make_zone("west")
    client = _client(east)
    wire = west.trust.own_bundle().to_spiffe_json()
    assert client.put("/v1/trust/bundles/west.mesh", content=wire).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.put("/v1/trust/bundles/west.mesh", content=wire, headers=wrong).status_code == 403
    assert client.post("/v1/trust/rotate", json={}, headers=wrong).status_code == 403
    assert east.trust.bundle_of(west.trust_domain) is None
    assert len(east.trust.own_bundle().roots) == 1


def test_import_rotate_and_federate_with_the_token(make_zone):
    east, west = make_zone("east"), make_zone("west")
    client = _client(east)
    admin = {"Authorization": f"Bearer {east.admin_token()}"}
    imported = client.put(
        "/v1/trust/bundles/west.mesh", content=west.trust.own_bundle().to_spiffe_json(), headers=admin
    )
    assert imported.status_code == 200, imported.text
    assert imported.json()["roots"] == west.trust.own_bundle().fingerprints()
    rotated = client.post("/v1/trust/rotate", json={"overlap_seconds": 3600}, headers=admin)
    assert rotated.status_code == 200
    assert len(east.trust.own_bundle().roots) == 2
    again = client.post("/v1/trust/rotate", json={}, headers=admin)
    assert again.status_code == 400
    assert "a rotation is in progress" in again.json()["detail"]
    federated = client.post(
        "/v1/trust/federations",
        json={"trust_domain": "west.mesh", "endpoint_url": "https://127.0.0.1:9/", "profile": "https_web"},
        headers=admin,
    )
    assert federated.status_code == 201
    assert east.trust.federations()[0].endpoint_url == "https://127.0.0.1:9/"
    _assert_no_secrets(east, imported.content, rotated.content, again.content, federated.content)


def test_a_bad_bundle_is_400_with_one_line_and_changes_nothing(make_zone):
    east = make_zone("east")
    client = _client(east)
    admin = {"Authorization": f"Bearer {east.admin_token()}"}
    response = client.put("/v1/trust/bundles/west.mesh", content=json.dumps({"keys": []}), headers=admin)
    assert response.status_code == 400
    assert "holds no authorities" in response.json()["detail"]
    assert "\n" not in response.json()["detail"]
    assert [s.bundle.trust_domain.name for s in east.trust.trusted_bundles()] == ["east.mesh"]


class _Poller:
    def __init__(self) -> None:
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1


def test_a_federation_made_through_the_api_wakes_the_zones_poller(make_zone):
    """The running zone's poller (``app.state.bundle_poller``) fetches at once instead of at its next round."""
    east = make_zone("east")
    client = _client(east)
    poller = _Poller()
    client.app.state.bundle_poller = poller  # type: ignore[attr-defined]
    admin = {"Authorization": f"Bearer {east.admin_token()}"}
    body = {"trust_domain": "west.mesh", "endpoint_url": "https://127.0.0.1:9/", "profile": "https_web"}
    assert client.post("/v1/trust/federations", json=body, headers=admin).status_code == 201
    assert poller.wakes == 1
    refused = client.post("/v1/trust/federations", json={**body, "endpoint_url": "http://x/"}, headers=admin)
    assert refused.status_code == 400
    assert poller.wakes == 1
