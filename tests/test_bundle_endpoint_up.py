"""``meshfed up`` serving its bundle endpoint: ``https_web`` with a given certificate, a bind address, and the hint.

Real ``meshfed up`` processes on loopback, fetched with meshfed's own client
the way a federating zone (or SPIRE, in ``tests/test_spire_interop.py``)
fetches them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import tomllib
from dataclasses import replace

import pytest
import tomli_w

from meshfed.errors import TrustError
from meshfed.runtime import ZoneSettings, assemble_zone
from meshfed.trust.bundle import DEFAULT_REFRESH_HINT_SECONDS, TrustBundle
from meshfed.trust.endpoint import BundleEndpointServer
from meshfed.trust.endpoint_client import EndpointSpec, fetch_bundle
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import Zone
from tests.conftest import free_port
from tests.test_bundle_endpoint import _web_pki
from tests.test_zone_process import ZoneProcess, ephemeral_flags, init_zone, meshfed_up_once, one_line_error

EAST = TrustDomain("east.mesh")
# A zone's default controller settings, its ingress on an ephemeral port.
CONTROLLER = replace(ZoneSettings().controller, gateway_address="127.0.0.1:0")


def _fetch_web(url: str, ca_pem: str) -> TrustBundle:
    return asyncio.run(fetch_bundle(EndpointSpec(EAST, url, "https_web", web_ca_pem=ca_pem), None))


def test_meshfed_up_serves_https_web_on_the_given_address_with_the_given_refresh_hint(tmp_path):
    east = init_zone(tmp_path / "east")
    pki = _web_pki(tmp_path, "east")
    port = free_port()
    flags = [
        *ephemeral_flags(),
        *("--bundle-endpoint-address", f"127.0.0.1:{port}"),
        *("--bundle-endpoint-web-cert", str(pki.server.cert_chain_file)),
        *("--bundle-endpoint-web-key", str(pki.server.key_file)),
        *("--bundle-refresh-hint", "42s"),
    ]
    zone = ZoneProcess(east, flags)
    try:
        zone.wait_serving()
        fetched = _fetch_web(f"https://127.0.0.1:{port}/", pki.ca_pem)
    finally:
        assert zone.stop() == 0
    own = Zone.open(east).trust.own_bundle()
    assert fetched.fingerprints() == own.fingerprints()
    assert fetched.refresh_hint_seconds == 42
    assert fetched.sequence == 2  # the new hint is new content: the sequence moved on once
    assert own.refresh_hint_seconds == 42  # stored: a rotation by the CLI counts its overlap in it


def test_the_refresh_hint_comes_from_the_flag_then_zone_toml_then_the_default(make_zone):
    east = make_zone("east")
    settings = ZoneSettings(controller=replace(CONTROLLER, health_check=None))
    assemble_zone(east, settings)
    assert east.trust.own_bundle().refresh_hint_seconds == DEFAULT_REFRESH_HINT_SECONDS
    assert east.trust.own_bundle().sequence == 1  # the default changes nothing for an existing zone

    config = east.directory / "zone.toml"
    document = tomllib.loads(config.read_text())
    config.write_text(tomli_w.dumps({"bundle_refresh_hint": "90s", **document}))
    east = Zone.open(east.directory)
    assemble_zone(east, settings)
    assert east.trust.own_bundle().refresh_hint_seconds == 90

    assemble_zone(east, ZoneSettings(controller=CONTROLLER, bundle_refresh_hint=None))
    assert east.trust.own_bundle().refresh_hint_seconds == 90
    assemble_zone(east, ZoneSettings(controller=CONTROLLER, bundle_refresh_hint=dt.timedelta(minutes=2)))
    assert east.trust.own_bundle().refresh_hint_seconds == 120
    # A rotation's default overlap is three hints of what the zone now publishes.
    generation = east.authority.rotate()
    assert generation.activate_at is not None
    assert (generation.activate_at - generation.created_at).total_seconds() == 360


def test_a_bad_refresh_hint_in_zone_toml_names_the_key(make_zone):
    east = make_zone("east")
    config = east.directory / "zone.toml"
    config.write_text(tomli_w.dumps({"bundle_refresh_hint": "0s", **tomllib.loads(config.read_text())}))
    with pytest.raises(Exception, match=r"bundle_refresh_hint: .*out of range"):
        Zone.open(east.directory)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--bundle-endpoint-port", "0", "--bundle-endpoint-address", "127.0.0.1:0"], "give one"),
        (["--bundle-endpoint-address", "127.0.0.1:0", "--bundle-endpoint-web-cert", "c.pem"], "give both or neither"),
        (
            ["--bundle-endpoint-web-cert", "c.pem", "--bundle-endpoint-web-key", "k.pem"],
            "give --bundle-endpoint-address",
        ),
        (["--bundle-endpoint-address", "127.0.0.1"], "--bundle-endpoint-address"),
    ],
)
def test_bundle_endpoint_flags_that_do_not_go_together_are_refused_before_anything_starts(tmp_path, flags, fragment):
    east = init_zone(tmp_path / "east")
    one_line_error(meshfed_up_once(east, [*ephemeral_flags(), *flags]), fragment)


def test_an_unreadable_web_certificate_is_one_line_naming_its_flags(tmp_path):
    east = init_zone(tmp_path / "east")
    missing = tmp_path / "missing.pem"
    flags = [
        *ephemeral_flags(),
        *("--bundle-endpoint-address", "127.0.0.1:0"),
        *("--bundle-endpoint-web-cert", str(missing), "--bundle-endpoint-web-key", str(missing)),
    ]
    one_line_error(meshfed_up_once(east, flags), "--bundle-endpoint-web-cert/--bundle-endpoint-web-key", "no such file")


def test_a_taken_bundle_endpoint_address_is_one_line_naming_its_flag(tmp_path):
    east = init_zone(tmp_path / "east")
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = meshfed_up_once(east, [*ephemeral_flags(), "--bundle-endpoint-address", f"127.0.0.1:{port}"])
    one_line_error(result, f"--bundle-endpoint-address 127.0.0.1:{port}: cannot listen there: address already in use")


def test_the_https_web_server_without_a_certificate_names_the_flags_that_exist(make_zone):
    east = make_zone("east")
    with pytest.raises(TrustError, match="--bundle-endpoint-web-cert/--bundle-endpoint-web-key"):
        BundleEndpointServer(lambda: east.trust.own_bundle().to_spiffe_json(), profile="https_web")
