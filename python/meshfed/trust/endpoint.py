"""The SPIFFE bundle endpoint: serving this zone's bundle, and fetching a federated zone's.

Both profiles of the SPIFFE Trust Domain and Bundle spec §5.2:

* ``https_web``: the server presents a certificate from a CA the consumer
  trusts (public Web PKI, or a given CA); the consumer checks the host name.
* ``https_spiffe``: the server presents an X.509-SVID of its zone; the consumer
  verifies it against the bundle it already holds for that trust domain (the
  bootstrap bundle first, then each refreshed one) and requires the SPIFFE ID
  it pinned.

The bundle is served at ``/`` (where SPIRE serves it) and at
``/v1/trust/bundle``; the HTTP needed is one GET, so a small asyncio server
does it, keeping the endpoint on its own port and TLS settings.
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
from typing import Literal
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshfed.errors import BundleFetchError, MeshfedError, TrustError
from meshfed.supervisor import Component, Supervisor
from meshfed.trust.bundle import TrustBundle, parse_bundle
from meshfed.trust.ca import Svid
from meshfed.trust.spiffe import SYSTEM_NAMESPACE, SpiffeId, TrustDomain
from meshfed.trust.svid import check_svid_rules, parse_certificates

log = logging.getLogger(__name__)

Profile = Literal["https_web", "https_spiffe"]
BUNDLE_PATHS = ("/", "/v1/trust/bundle")
MAX_BUNDLE_BYTES = 1 << 20
# How often the https_spiffe endpoint checks that the CA of its SVID still signs.
SIGNER_CHECK_INTERVAL = dt.timedelta(seconds=5)
_MAX_REQUEST_HEAD = 8192
_IO_TIMEOUT = 10.0


def endpoint_spiffe_id(trust_domain: TrustDomain) -> SpiffeId:
    """The SPIFFE ID a zone's bundle endpoint presents in the ``https_spiffe`` profile (the controller's)."""
    return trust_domain.workload(SYSTEM_NAMESPACE, "controller")


# -- server ------------------------------------------------------------------------------------------------------


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
            self._server = await asyncio.start_server(self._serve, self._host, self._port, ssl=self._context)
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


# -- client ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointSpec:
    """How to reach and authenticate one trust domain's bundle endpoint."""

    trust_domain: TrustDomain
    url: str
    profile: Profile
    endpoint_spiffe_id: SpiffeId | None = None
    web_ca_pem: str | None = None


# Redirects followed at most (each to https only, each target authenticated as the first would be).
MAX_REDIRECTS = 3


async def fetch_bundle(
    spec: EndpointSpec,
    verification_bundle: TrustBundle | None,
    timeout: float = _IO_TIMEOUT,
) -> TrustBundle:
    """GET the bundle of ``spec.trust_domain`` from its endpoint, authenticated per the profile.

    ``verification_bundle`` is the bundle held for the endpoint SPIFFE ID's
    trust domain (``https_spiffe`` only): the bootstrap bundle, then each
    refreshed one.

    HTTP is httpx's: chunked bodies (SPIRE chunks any bundle over 2 KiB, so
    every bundle with two roots), bodies split across TLS records, redirects
    (https only, at most :data:`MAX_REDIRECTS`), one timeout for each step. For
    ``https_spiffe`` the server's SVID is checked against the pinned SPIFFE ID
    before a byte of the body is read; the body is bounded by
    :data:`MAX_BUNDLE_BYTES` while it streams.
    """
    url = spec.url
    context = _client_context(spec, verification_bundle)
    async with httpx.AsyncClient(verify=context, timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme != "https" or not parts.hostname:
                raise BundleFetchError(f"bundle endpoint {url!r} of {spec.trust_domain} must be an https:// URL")
            try:
                async with client.stream("GET", url, headers={"Accept": "application/json"}) as response:
                    if spec.profile == "https_spiffe":
                        _check_endpoint_identity(spec, url, response)
                    if response.is_redirect and "location" in response.headers:
                        url = str(response.url.join(response.headers["location"]))
                        continue
                    if response.status_code != httpx.codes.OK:
                        raise BundleFetchError(
                            f"bundle endpoint {url} of {spec.trust_domain} answered {response.status_code} "
                            f"{response.reason_phrase}, expected 200"
                        )
                    body = await _bounded_body(spec, url, response)
            except httpx.ConnectError as err:
                raise BundleFetchError(_connect_failure(spec, url, err)) from None
            except httpx.TimeoutException:
                raise BundleFetchError(
                    f"bundle endpoint {url} of {spec.trust_domain} did not answer within {timeout:g}s; "
                    "is it running and reachable from this zone?"
                ) from None
            except httpx.HTTPError as err:
                raise BundleFetchError(f"bundle endpoint {url} of {spec.trust_domain}: {err}") from None
            return parse_bundle(spec.trust_domain, body)
    raise BundleFetchError(
        f"bundle endpoint {spec.url} of {spec.trust_domain} redirected more than {MAX_REDIRECTS} times"
    )


async def _bounded_body(spec: EndpointSpec, url: str, response: httpx.Response) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BUNDLE_BYTES:
        raise BundleFetchError(
            f"bundle endpoint {url} sends {declared} bytes, more than {MAX_BUNDLE_BYTES}; refusing it"
        )
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > MAX_BUNDLE_BYTES:
            raise BundleFetchError(f"bundle endpoint {url} sent more than {MAX_BUNDLE_BYTES} bytes; refusing it")
    return bytes(body)


def _connect_failure(spec: EndpointSpec, url: str, err: httpx.ConnectError) -> str:
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (
            f"bundle endpoint {url} of {spec.trust_domain}: server certificate refused ({cause.verify_message}); "
            f"{_what_to_check(spec)}"
        )
    return (
        f"cannot reach the bundle endpoint {url} of {spec.trust_domain}: {err or type(err).__name__}; "
        "is it running and reachable from this zone?"
    )


def _client_context(spec: EndpointSpec, verification_bundle: TrustBundle | None) -> ssl.SSLContext:
    if spec.profile == "https_web":
        return ssl.create_default_context(cadata=spec.web_ca_pem) if spec.web_ca_pem else ssl.create_default_context()
    if spec.endpoint_spiffe_id is None:
        raise BundleFetchError(f"federation with {spec.trust_domain}: https_spiffe needs the endpoint's SPIFFE ID")
    if verification_bundle is None or not verification_bundle.roots:
        raise BundleFetchError(
            f"federation with {spec.trust_domain}: no bundle of {spec.endpoint_spiffe_id.trust_domain} to "
            "authenticate the endpoint; give a bootstrap bundle (--bootstrap-bundle)"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # An SVID names a workload by URI SAN, not a DNS name: the SPIFFE ID is checked below instead.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=verification_bundle.to_pem().decode())
    return context


def _check_endpoint_identity(spec: EndpointSpec, url: str, response: httpx.Response) -> None:
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise BundleFetchError(f"bundle endpoint {url} presented no certificate")
    leaf = x509.load_der_x509_certificate(der)
    try:
        presented = check_svid_rules(parse_certificates(leaf.public_bytes(Encoding.PEM)))
    except TrustError as err:
        raise BundleFetchError(f"bundle endpoint {url} presented an invalid SVID: {err}") from None
    if presented != spec.endpoint_spiffe_id:
        raise BundleFetchError(
            f"bundle endpoint {url} presented {presented}, not the pinned {spec.endpoint_spiffe_id}; refusing it"
        )


def _what_to_check(spec: EndpointSpec) -> str:
    if spec.profile == "https_web":
        return "does the endpoint's certificate come from a CA this zone trusts (--web-ca) and name this host?"
    return f"is the held bundle of {spec.endpoint_spiffe_id} current (re-bootstrap with --bootstrap-bundle)?"


__all__ = [
    "BUNDLE_PATHS",
    "BundleEndpointServer",
    "EndpointSpec",
    "Profile",
    "WebCertificate",
    "endpoint_spiffe_id",
    "fetch_bundle",
]
