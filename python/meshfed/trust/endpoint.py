"""The SPIFFE bundle endpoint server: serving this zone's bundle over HTTPS.

Both profiles of the SPIFFE Trust Domain and Bundle spec §5.2, as the server
presents them:

* ``https_web``: a certificate chain from a CA the consumers trust (public Web
  PKI, or a given CA), from files (:class:`WebCertificate`).
* ``https_spiffe``: an X.509-SVID of its zone with the SPIFFE ID
  :func:`endpoint_spiffe_id`, renewed at half-life and when its CA retires.

The bundle is served at ``/`` (where SPIRE serves it) and at
``/v1/trust/bundle``; the HTTP needed is one GET, so a small asyncio server
does it, keeping the endpoint on its own port and TLS settings.

Fetching a federated zone's bundle, the consumer's side, is
:mod:`meshfed.trust.endpoint_client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from meshfed.errors import MeshfedError, TrustError
from meshfed.supervisor import Component, Supervisor
from meshfed.trust.ca import Svid
from meshfed.trust.endpoint_client import Profile
from meshfed.trust.spiffe import SYSTEM_NAMESPACE, SpiffeId, TrustDomain

log = logging.getLogger(__name__)

BUNDLE_PATHS = ("/", "/v1/trust/bundle")
# How often the https_spiffe endpoint checks that the CA of its SVID still signs.
SIGNER_CHECK_INTERVAL = dt.timedelta(seconds=5)
# The most a request's head may be: a bundle GET is a few hundred bytes, and a stranger may send anything.
MAX_REQUEST_HEAD = 8192
_IO_TIMEOUT = 10.0


def endpoint_spiffe_id(trust_domain: TrustDomain) -> SpiffeId:
    """The SPIFFE ID a zone's bundle endpoint presents in the ``https_spiffe`` profile (the controller's)."""
    return trust_domain.workload(SYSTEM_NAMESPACE, "controller")


@dataclass(frozen=True)
class WebCertificate:
    """The ``https_web`` server certificate chain and key files (from a CA the consumers trust)."""

    cert_chain_file: Path
    key_file: Path

    def check(self) -> None:
        """Load the pair once, so a bad file is one line before anything binds."""
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert_chain_file, self.key_file)
        except FileNotFoundError as err:
            raise TrustError(
                f"--bundle-endpoint-web-cert/--bundle-endpoint-web-key: {err.filename}: no such file"
            ) from None
        except (OSError, ssl.SSLError) as err:
            raise TrustError(
                f"--bundle-endpoint-web-cert {self.cert_chain_file} / --bundle-endpoint-web-key {self.key_file}: "
                f"cannot load them ({err}); give a PEM certificate chain and its unencrypted PEM private key"
            ) from None


class BundleEndpointServer:
    """Serve a bundle over HTTPS; a controller service (``start``/``stop``).

    ``bundle`` returns the SPIFFE JSON to serve, read on every request so a
    rotation is visible at once. For ``https_spiffe``, ``issue_svid`` makes
    the server's SVID; it is renewed at half-life into the same TLS context,
    so new connections get the new one with no restart, and sooner when
    ``svid_current`` (checked every :data:`SIGNER_CHECK_INTERVAL`) says the CA
    that signed it no longer signs (a rotation finished early). ``flag`` names
    the setting that chose the address, for the one-line bind error.
    """

    def __init__(
        self,
        bundle: Callable[[], bytes],
        *,
        profile: Profile,
        host: str = "127.0.0.1",
        port: int = 0,
        web_certificate: WebCertificate | None = None,
        issue_svid: Callable[[], Svid] | None = None,
        svid_current: Callable[[Svid], bool] | None = None,
        supervisor: Supervisor | None = None,
        flag: str = "--bundle-endpoint-address/--bundle-endpoint-port",
    ) -> None:
        if profile == "https_web" and web_certificate is None:
            raise TrustError(
                "the https_web bundle endpoint needs a server certificate and key "
                "(--bundle-endpoint-web-cert/--bundle-endpoint-web-key)"
            )
        if profile == "https_spiffe" and issue_svid is None:
            raise TrustError("the https_spiffe bundle endpoint needs a way to issue its SVID")
        self._bundle = bundle
        self._profile = profile
        self._host, self._port = host, port
        self._web_certificate = web_certificate
        self._issue_svid = issue_svid
        self._svid_current = svid_current
        self._flag = flag
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._server: asyncio.Server | None = None
        self._supervisor = supervisor or Supervisor("bundle-endpoint")
        self._renewal: Component | None = None
        self._svid: Svid | None = None  # the https_spiffe SVID being presented
        self.requests_served = 0

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise MeshfedError("the bundle endpoint is not running")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"https://{host}:{port}/"

    async def start(self) -> None:
        if self._web_certificate is not None and self._profile == "https_web":
            try:
                self._context.load_cert_chain(self._web_certificate.cert_chain_file, self._web_certificate.key_file)
            except (OSError, ssl.SSLError) as err:
                raise TrustError(
                    f"cannot load the bundle endpoint's web certificate {self._web_certificate.cert_chain_file} and "
                    f"key {self._web_certificate.key_file} ({err}); give a PEM chain and its unencrypted PEM key "
                    "(--bundle-endpoint-web-cert/--bundle-endpoint-web-key)"
                ) from None
        else:
            await asyncio.to_thread(self._load_svid)
            self._renewal = self._supervisor.spawn("bundle-endpoint-svid", self._renew)
        try:
            self._server = await asyncio.start_server(
                self._serve, self._host, self._port, ssl=self._context, limit=MAX_REQUEST_HEAD
            )
        except OSError as err:
            await self.stop()
            raise TrustError(
                f"the bundle endpoint cannot listen on {self._host}:{self._port}: {err.strerror or err}; "
                f"is another zone or program using the port? ({self._flag})"
            ) from err
        log.info("bundle endpoint (%s) serving on %s", self._profile, self.url)

    async def stop(self) -> None:
        if self._renewal is not None:
            await self._renewal.cancel()
            self._renewal = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _load_svid(self) -> None:
        assert self._issue_svid is not None
        svid = self._issue_svid()
        with _private_files(svid) as (cert_file, key_file):
            self._context.load_cert_chain(cert_file, key_file)
        self._svid = svid

    async def renew_if_signer_retired(self) -> bool:
        """Present a new SVID now if the CA that signed the current one no longer signs; True if it did.

        The zone calls it when a rotation finishes early, so consumers holding only the new bundle
        reach the endpoint at once; the renewal loop also checks every :data:`SIGNER_CHECK_INTERVAL`,
        for a rotation finished by another process (the CLI).
        """
        svid = self._svid
        if svid is None or self._svid_current is None or await asyncio.to_thread(self._svid_current, svid):
            return False
        log.info("bundle endpoint: its SVID's CA no longer signs; presenting a new SVID")
        await asyncio.to_thread(self._load_svid)
        return True

    async def _renew(self) -> None:
        while True:
            assert self._svid is not None
            lifetime = self._svid.leaf.not_valid_after_utc - self._svid.leaf.not_valid_before_utc
            renew_at = self._svid.leaf.not_valid_before_utc + lifetime / 2
            delay = max((renew_at - dt.datetime.now(dt.UTC)).total_seconds(), 1.0)
            if self._svid_current is not None:
                delay = min(delay, SIGNER_CHECK_INTERVAL.total_seconds())
            await asyncio.sleep(delay)
            try:
                if dt.datetime.now(dt.UTC) < renew_at:
                    await self.renew_if_signer_retired()
                else:
                    await asyncio.to_thread(self._load_svid)
            except MeshfedError as err:
                log.error("bundle endpoint SVID renewal failed, retrying: %s", err)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _IO_TIMEOUT)
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            if method != "GET":
                await _respond(writer, 405, b"only GET is served here\n", "text/plain")
            elif path not in BUNDLE_PATHS:
                await _respond(writer, 404, b"the bundle is at /\n", "text/plain")
            else:
                body = await asyncio.to_thread(self._bundle)
                await _respond(writer, 200, body, "application/json")
                self.requests_served += 1
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ssl.SSLError):
            pass  # a client that went away or sent junk gets nothing more
        except MeshfedError as err:
            log.error("bundle endpoint cannot serve the bundle: %s", err)
            await _respond(writer, 503, b"bundle unavailable\n", "text/plain")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()


async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str) -> None:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()


@contextlib.contextmanager
def _private_files(svid: Svid) -> Iterator[tuple[str, str]]:
    # ssl only loads keys from files: write them 0600 in a private directory, delete at once.
    with tempfile.TemporaryDirectory(prefix="meshfed-endpoint-") as directory:
        cert_file, key_file = Path(directory) / "svid.pem", Path(directory) / "svid.key"
        cert_file.write_bytes(svid.cert_chain_pem())
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(svid.private_key_pem())
        yield str(cert_file), str(key_file)


__all__ = ["BUNDLE_PATHS", "MAX_REQUEST_HEAD", "BundleEndpointServer", "WebCertificate", "endpoint_spiffe_id"]
