"""Fetching a federated trust domain's bundle from its SPIFFE bundle endpoint (the consumer's side).

Both profiles of the SPIFFE Trust Domain and Bundle spec §5.2, as a consumer
authenticates the endpoint:

* ``https_web``: the server presents a certificate from a CA the consumer
  trusts (public Web PKI, or a given CA); the consumer checks the host name.
* ``https_spiffe``: the server presents an X.509-SVID of its zone; the consumer
  verifies it against the bundle it already holds for that trust domain (the
  bootstrap bundle first, then each refreshed one) and requires the SPIFFE ID
  it pinned.

The server side, which serves this zone's bundle, is
:mod:`meshfed.trust.endpoint`; :data:`Profile` is defined here for both.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshfed.errors import BundleFetchError, TrustError
from meshfed.trust.bundle import TrustBundle, parse_bundle
from meshfed.trust.spiffe import SpiffeId, TrustDomain
from meshfed.trust.svid import check_svid_rules, parse_certificates

Profile = Literal["https_web", "https_spiffe"]
MAX_BUNDLE_BYTES = 1 << 20
_IO_TIMEOUT = 10.0


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
    "MAX_BUNDLE_BYTES",
    "MAX_REDIRECTS",
    "EndpointSpec",
    "Profile",
    "fetch_bundle",
]
