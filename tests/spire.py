"""A real SPIRE server for one test: its own config, datastore and ports, started and stopped by the test.

The binary is the one ``tests/servers/build spire`` made from the Go module
proxy (``real_spire()``). The server's federation bundle endpoint speaks the
``https_spiffe`` profile, presenting ``spiffe://<td>/spire/server``.

Options a test may need: ``upstream`` (a CA certificate and key) makes SPIRE's
X.509 authority an intermediate of that CA through the ``disk``
UpstreamAuthority, so its root survives a fresh datastore
(:meth:`SpireServer.restart`); ``web_roots`` is the PEM file SPIRE trusts for
``https_web`` bundle endpoints: SPIRE's federation config has no CA setting of
its own (the bundle client uses Go's system pool), so it goes in as
``SSL_CERT_FILE``, which Go's crypto/x509 reads on Linux.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import free_port
from tests.servers import real_spire

_CONFIG = """
server {{
  bind_address = "127.0.0.1"
  bind_port = "{port}"
  socket_path = "{socket}"
  trust_domain = "{trust_domain}"
  data_dir = "{data}"
  log_level = "WARN"
  ca_ttl = "24h"
  default_x509_svid_ttl = "1h"
  federation {{
    bundle_endpoint {{
      address = "127.0.0.1"
      port = {bundle_port}
      refresh_hint = "15s"
      profile "https_spiffe" {{}}
    }}
  }}
}}

plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = "{data}/datastore.sqlite3"
    }}
  }}
  KeyManager "memory" {{
    plugin_data {{}}
  }}
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}{upstream}
}}
"""

_UPSTREAM = """
  UpstreamAuthority "disk" {{
    plugin_data {{
      cert_file_path = "{cert}"
      key_file_path = "{key}"
    }}
  }}"""


@dataclass
class SpireServer:
    """A running ``spire-server``; its CLI is ``run(...)``."""

    binary: str
    socket: Path
    trust_domain: str
    bundle_endpoint_url: str
    process: subprocess.Popen[bytes]
    log: Path
    config: Path
    data: Path
    env: dict[str, str]

    @property
    def endpoint_spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/spire/server"

    def run(self, *args: str) -> str:
        """``spire-server ARGS -socketPath ...``; its stdout, or a failure with its output."""
        result = subprocess.run(
            [self.binary, *args, "-socketPath", str(self.socket)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"spire-server {' '.join(args)}: {result.stdout}{result.stderr}"
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-output", "json"))

    def bundle(self) -> bytes:
        """The trust bundle as SPIFFE bundle JSON (what operators hand to a federating zone)."""
        return self.run("bundle", "show", "-format", "spiffe").encode()

    def federated_bundle(self, trust_domain: str) -> bytes | None:
        """The bundle SPIRE holds for a federated ``trust_domain`` (SPIFFE JSON), or None if it holds none."""
        result = self.try_run("bundle", "list", "-id", f"spiffe://{trust_domain}", "-format", "spiffe")
        if result.returncode != 0:
            assert "not found" in result.stdout + result.stderr, result.stdout + result.stderr
            return None
        return result.stdout.encode()

    def try_run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``spire-server ARGS -socketPath ...`` whatever its outcome."""
        return subprocess.run(
            [self.binary, *args, "-socketPath", str(self.socket)], capture_output=True, text=True, timeout=60
        )

    def restart(self, *, fresh_datastore: bool) -> None:
        """Stop the server and start it again on the same config and ports; ``fresh_datastore`` first
        deletes everything it stored (a redeploy that lost its database: bundle sequence from the start)."""
        _stop(self.process)
        if fresh_datastore:
            shutil.rmtree(self.data)
            self.data.mkdir()
        self.process = _start(self.binary, self.config, self.log, self.env)
        _wait_healthy(self)


@contextlib.contextmanager
def spire_server(
    trust_domain: str = "spire.test", *, upstream: tuple[Path, Path] | None = None, web_roots: Path | None = None
) -> Iterator[SpireServer]:
    binary = real_spire().spire_server
    # A short directory: the API's unix socket path must stay under 108 bytes.
    home = Path(tempfile.mkdtemp(prefix="spire-", dir="/tmp"))
    server: SpireServer | None = None
    try:
        socket, data = home / "api.sock", home / "data"
        data.mkdir()
        bundle_port = free_port()
        config = home / "server.conf"
        config.write_text(
            _CONFIG.format(
                port=free_port(),
                socket=socket,
                trust_domain=trust_domain,
                data=data,
                bundle_port=bundle_port,
                upstream="" if upstream is None else _UPSTREAM.format(cert=upstream[0], key=upstream[1]),
            )
        )
        env = dict(os.environ)
        if web_roots is not None:
            env["SSL_CERT_FILE"] = str(web_roots)
        log = home / "server.log"
        process = _start(binary, config, log, env)
        server = SpireServer(
            binary, socket, trust_domain, f"https://127.0.0.1:{bundle_port}", process, log, config, data, env
        )
        _wait_healthy(server)
        yield server
    finally:
        if server is not None:
            _stop(server.process)
        shutil.rmtree(home, ignore_errors=True)


def _start(binary: str, config: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [binary, "run", "-config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_healthy(server: SpireServer) -> None:
    # `healthcheck` itself waits (it retries until the server answers); a dead server fails at once.
    for _ in range(60):
        if server.process.poll() is not None:
            raise AssertionError(f"spire-server exited: {server.log.read_text()[-2000:]}")
        result = subprocess.run(
            [server.binary, "healthcheck", "-socketPath", str(server.socket), "-shallow"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode == 0:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=0.5)  # a pause that ends early if the server dies
    raise AssertionError(f"spire-server never became healthy: {server.log.read_text()[-2000:]}")
