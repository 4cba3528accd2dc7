"""Property-based calls to every operation of the zone's OpenAPI spec: no call may cause a server error.

Schemathesis generates requests from ``/openapi.json`` and sends them to a real
zone (controller, gateway, peering) served by uvicorn on loopback, with the
admin token so that mutating operations get past authentication.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok

from meshfed.controller import ControllerSettings
from meshfed.federation.settings import PeeringSettings
from meshfed.runtime import ZoneSettings, assemble_zone
from meshfed.zone import Zone

LOOPBACK = ZoneSettings(
    controller=ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0),
    peering=PeeringSettings(listen_address="127.0.0.1:0", establish_address="127.0.0.1:0"),
)


@pytest.fixture(scope="module")
def zone_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    zone = Zone.init(Path(tmp_path_factory.mktemp("schema")) / "east", "east", "east.mesh")
    server = uvicorn.Server(
        uvicorn.Config(assemble_zone(zone, LOOPBACK).app(), host="127.0.0.1", port=0, log_level="warning")
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "the zone API died while starting"
        assert time.monotonic() < deadline, "the zone API did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", zone.admin_token()
    server.should_exit = True
    thread.join(timeout=30)
    loop.close()


def test_no_generated_request_causes_a_server_error(zone_api: tuple[str, str]) -> None:
    base_url, token = zone_api
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results), "some operations of the spec do not parse"
    assert len(operations) >= 20, "the spec lost operations"
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case):
            case.call_and_validate(
                base_url=base_url, headers={"Authorization": f"Bearer {token}"}, checks=[not_a_server_error]
            )

        call()
