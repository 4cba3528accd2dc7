"""A real SPIRE server for one test: its own config, datastore and ports, started and stopped by the test.

The binary is the one ``tests/servers/build spire`` made from the Go module
proxy (``real_spire()``). The server's federation bundle endpoint speaks the
``https_spiffe`` profile, presenting ``spiffe://<td>/spire/server``.
"""

from __future__ import annotations

import contextlib
import json
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
  }}
}}
"""


@dataclass
class SpireServer:
    """A running ``spire-server``; its CLI is ``run(...)``."""

    binary: str
    socket: Path
    trust_domain: str
    bundle_endpoint_url: str
    process: subprocess.Popen[bytes]
    log: Path

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


@contextlib.contextmanager
def spire_server(trust_domain: str = "spire.test") -> Iterator[SpireServer]:
    binary = real_spire().spire_server
    # A short directory: the API's unix socket path must stay under 108 bytes.
    home = Path(tempfile.mkdtemp(prefix="spire-", dir="/tmp"))
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
            )
        )
        log = home / "server.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [binary, "run", "-config", str(config)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        server = SpireServer(binary, socket, trust_domain, f"https://127.0.0.1:{bundle_port}", process, log)
        try:
            _wait_healthy(server)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        shutil.rmtree(home, ignore_errors=True)


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
