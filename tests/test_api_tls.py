"""``meshfed up --api-tls-cert/--api-tls-key`` and ``--metrics-address``: a real zone process on loopback.

The API then speaks only HTTPS with the given certificate (and still wants its
tokens); the metrics address serves ``/healthz``, ``/readyz`` and ``/metrics``
in plain HTTP without a token, and nothing else, which is what the chart's
probes and Prometheus use while the API stays on loopback or behind TLS.
"""

from __future__ import annotations

import signal
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from meshfed.zone import Zone
from tests.conftest import free_port
from tests.test_bundle_endpoint import _web_pki
from tests.test_zone_process import ZoneProcess, ephemeral_flags, init_zone, meshfed_up_once, one_line_error


@contextmanager
def meshfed_up(directory: Path, flags: list[str]) -> Iterator[ZoneProcess]:
    zone = ZoneProcess(directory, flags)
    try:
        zone.wait_serving()
        yield zone
        zone.process.send_signal(signal.SIGTERM)
        # Both servers drain and the process exits 0: the health listener never holds the shutdown.
        assert zone.process.wait(timeout=30) == 0, zone.log
    finally:
        zone.process.kill()
        zone.process.wait()


def _flags(api: str, metrics: str, *extra: str) -> list[str]:
    rest = ephemeral_flags()
    index = rest.index("--api-address")
    del rest[index : index + 2]
    return ["--api-address", api, "--metrics-address", metrics, *rest, *extra]


def test_the_api_serves_only_https_with_its_certificate_and_metrics_stay_plain(tmp_path: Path) -> None:
    directory = init_zone(tmp_path / "east")
    pki = _web_pki(tmp_path, "api")
    api_port, metrics_port = free_port(), free_port()
    flags = _flags(
        f"127.0.0.1:{api_port}",
        f"127.0.0.1:{metrics_port}",
        *("--api-tls-cert", str(pki.server.cert_chain_file), "--api-tls-key", str(pki.server.key_file)),
    )
    zone = Zone.open(directory)
    with meshfed_up(directory, flags) as running:
        assert running.api_url == f"https://127.0.0.1:{api_port}"
        assert running.metrics_url == f"http://127.0.0.1:{metrics_port}"
        trusted = ssl.create_default_context(cadata=pki.ca_pem)
        with httpx.Client(base_url=running.api_url, verify=trusted, timeout=10) as api:
            assert api.get("/v1/catalog").status_code == 401  # TLS is no substitute for a token
            reader = {"Authorization": f"Bearer {zone.read_token()}"}
            assert api.get("/v1/zone", headers=reader).json()["name"] == "east"
            assert api.get("/healthz").json() == {"status": "ok"}
        # Not the certificate the client trusts: the handshake fails before any byte of HTTP.
        with pytest.raises(httpx.ConnectError), httpx.Client(base_url=running.api_url, timeout=10) as untrusting:
            untrusting.get("/healthz")
        # Plain HTTP to the TLS port is not served.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=10)

        with httpx.Client(base_url=running.metrics_url, timeout=10) as metrics:
            assert metrics.get("/healthz").json() == {"status": "ok"}
            assert metrics.get("/readyz").json()["status"] == "ready"
            assert "meshfed_gateway_connections_total" in metrics.get("/metrics").text
            admin = {"Authorization": f"Bearer {zone.admin_token()}"}
            for path in ("/v1/zone", "/v1/catalog", "/v1/gateway/stats", "/openapi.json", "/docs"):
                # Not even with the admin token: this port carries no API.
                assert metrics.get(path, headers=admin).status_code == 404, path
            assert metrics.post("/v1/gateway/reconfigure", headers=admin).status_code == 404


def test_without_tls_flags_the_api_is_plain_http(tmp_path: Path) -> None:
    directory = init_zone(tmp_path / "east")
    api_port = free_port()
    with meshfed_up(directory, _flags(f"127.0.0.1:{api_port}", "127.0.0.1:0")) as running:
        assert running.api_url == f"http://127.0.0.1:{api_port}"
        assert httpx.get(f"{running.api_url}/healthz", timeout=10).json() == {"status": "ok"}


def test_bad_tls_flags_are_one_line_before_anything_binds(tmp_path: Path) -> None:
    directory = init_zone(tmp_path / "east")
    pki = _web_pki(tmp_path, "api")
    cert, key = str(pki.server.cert_chain_file), str(pki.server.key_file)
    base = ephemeral_flags()
    half = meshfed_up_once(directory, [*base, "--api-tls-cert", cert])
    assert half.returncode == 2  # a usage error, as for every other flag of `up`
    assert "give both or neither" in half.stderr
    assert "Traceback" not in half.stderr
    one_line_error(
        meshfed_up_once(directory, [*base, "--api-tls-cert", str(tmp_path / "nope.pem"), "--api-tls-key", key]),
        "--api-tls-cert/--api-tls-key:",
        "nope.pem: no such file",
    )
    (tmp_path / "not-a-key.pem").write_text("not a key\n")
    one_line_error(
        meshfed_up_once(directory, [*base, "--api-tls-cert", cert, "--api-tls-key", str(tmp_path / "not-a-key.pem")]),
        f"--api-tls-cert {cert} / --api-tls-key",
        "cannot load them",
    )


def test_a_taken_metrics_port_names_its_flag(tmp_path: Path) -> None:
    directory = init_zone(tmp_path / "east")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = meshfed_up_once(directory, [*ephemeral_flags(), "--metrics-address", f"127.0.0.1:{port}"])
    one_line_error(result, f"--metrics-address 127.0.0.1:{port}: cannot listen there: address already in use")
