"""X.509-SVIDs from files: parse, check the X.509-SVID rules, verify against a trust domain's bundle.

Three separate steps, because callers need them separately:

* :func:`parse_x509_svid` reads PEM certificates and a PKCS#8 key (one file or
  two, in either order) and checks that the key belongs to the leaf;
* :func:`check_svid_rules` applies the X.509-SVID spec's rules (§3, §4, §5.2)
  to a chain, leaf first, and returns the leaf's SPIFFE ID;
* :func:`verify_x509_svid` walks the chain to a root of the bundle of *the
  leaf's own trust domain* (never a merged pool: federation spec §4.2) at a
  given time.

Every refusal is an :class:`InvalidSvidError` or :class:`UntrustedSvidError`
whose one-line message names the rule that was broken.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from meshfed.errors import InvalidSpiffeIdError, InvalidSvidError, UntrustedSvidError
from meshfed.trust.bundle import TrustBundle
from meshfed.trust.spiffe import SpiffeId, TrustDomain

# RFC 5280 allows longer paths; SPIFFE deployments use one or two intermediates.
# The cap bounds the work an attacker-supplied chain can cause.
MAX_CHAIN_DEPTH = 8
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)

BundleSource = Mapping[TrustDomain, TrustBundle] | Callable[[TrustDomain], TrustBundle | None]


@dataclass(frozen=True)
class X509Svid:
    """A parsed X.509-SVID: its ID, the chain (leaf first) and, when loaded with one, its private key."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKeyTypes | None = None

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    def __repr__(self) -> str:
        # Never let a key reach a log line through a repr.
        return f"X509Svid({self.spiffe_id}, {len(self.chain)} certificate(s))"


def load_x509_svid(cert_file: Path, key_file: Path) -> X509Svid:
    """Read an X.509-SVID from a certificate file and a key file (they may be the same file)."""
    return parse_x509_svid(cert_file.read_bytes(), key_file.read_bytes())


def parse_x509_svid(cert_pem: bytes, key_pem: bytes) -> X509Svid:
    """Parse PEM certificates (leaf first) and a PKCS#8 private key, and check the X.509-SVID rules."""
    chain = parse_certificates(cert_pem)
    key = _parse_private_key(key_pem)
    if _public_der(chain[0].public_key()) != _public_der(key.public_key()):
        raise InvalidSvidError("the private key does not match the leaf certificate's public key")
    return X509Svid(check_svid_rules(chain), chain, key)


def parse_certificates(data: bytes) -> tuple[x509.Certificate, ...]:
    """Every ``CERTIFICATE`` block of ``data``, in order; other blocks (a key) are skipped."""
    blocks = _PEM_BLOCK.findall(data)
    if not _PEM_BLOCK.search(data):
        raise InvalidSvidError("the certificate file is not PEM (no '-----BEGIN CERTIFICATE-----' block)")
    if b"CERTIFICATE" not in blocks:
        raise InvalidSvidError("no certificates found in the certificate file")
    certificates = []
    for match in _PEM_BLOCK.finditer(data):
        if match.group(1) != b"CERTIFICATE":
            continue
        try:
            certificates.append(x509.load_pem_x509_certificate(match.group(0)))
        except ValueError as err:
            raise InvalidSvidError(f"certificate {len(certificates) + 1} is corrupt: {err}") from None
    return tuple(certificates)


def check_svid_rules(chain: Sequence[x509.Certificate]) -> SpiffeId:
    """Apply the X.509-SVID rules to ``chain`` (leaf first) and return the leaf's SPIFFE ID."""
    if not chain:
        raise InvalidSvidError("an X.509-SVID needs at least one certificate")
    leaf, signers = chain[0], chain[1:]
    spiffe_id = _spiffe_id(leaf, "leaf")
    if spiffe_id is None:
        raise InvalidSvidError("the leaf has no URI SAN, so no SPIFFE ID (X.509-SVID §2)")
    if not spiffe_id.path:
        raise InvalidSvidError(f"leaf SPIFFE ID {spiffe_id} has no path; a leaf SVID names a workload (§3.1)")
    if _is_ca(leaf):
        raise InvalidSvidError("the leaf certificate must not be a CA (basicConstraints cA=true; §4.1)")
    usage = _key_usage(leaf, "leaf")
    if not usage.digital_signature:
        raise InvalidSvidError("the leaf certificate must have the digitalSignature key usage (§4.3)")
    if usage.key_cert_sign:
        raise InvalidSvidError("the leaf certificate must not have the keyCertSign key usage (§4.3)")
    if usage.crl_sign:
        raise InvalidSvidError("the leaf certificate must not have the cRLSign key usage (§4.3)")
    for position, signer in enumerate(signers, start=1):
        what = f"signing certificate {position}"
        if not _is_ca(signer):
            raise InvalidSvidError(f"{what} must be a CA (basicConstraints cA=true; §4.1)")
        if not _key_usage(signer, what).key_cert_sign:
            raise InvalidSvidError(f"{what} must have the keyCertSign key usage (§4.3)")
        signer_id = _spiffe_id(signer, what)
        if signer_id is not None and signer_id.path:
            raise InvalidSvidError(f"{what} carries SPIFFE ID {signer_id}; a signing certificate's ID has no path")
    return spiffe_id


def verify_x509_svid(chain: Sequence[x509.Certificate], bundles: BundleSource, at: dt.datetime) -> SpiffeId:
    """Check the rules, then verify ``chain`` against the bundle of the leaf's trust domain at ``at``.

    ``bundles`` maps trust domains to bundles (or is a lookup function); only
    the leaf's own trust domain's roots are ever tried.
    """
    spiffe_id = check_svid_rules(chain)
    domain = spiffe_id.trust_domain
    bundle = bundles(domain) if callable(bundles) else bundles.get(domain)
    if bundle is None or not bundle.roots:
        raise UntrustedSvidError(f"{spiffe_id}: this zone trusts no X.509 roots of {domain}; import its bundle")
    _check_time(chain[0], "the leaf", at)
    current, pool = chain[0], list(chain[1:])
    for _ in range(MAX_CHAIN_DEPTH):
        for root in bundle.roots:
            if _issued_by(current, root):
                _check_time(root, f"root {root.subject.rfc4514_string()!r} of {domain}", at)
                return spiffe_id
        issuer = next((candidate for candidate in pool if _issued_by(current, candidate)), None)
        if issuer is None:
            raise UntrustedSvidError(
                f"{spiffe_id}: the chain does not lead to any root in the bundle of {domain} "
                f"(issuer {current.issuer.rfc4514_string()!r}); is the bundle current?"
            )
        _check_time(issuer, f"signing certificate {issuer.subject.rfc4514_string()!r}", at)
        pool.remove(issuer)
        current = issuer
    raise UntrustedSvidError(f"{spiffe_id}: the chain is longer than {MAX_CHAIN_DEPTH} certificates")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _check_time(cert: x509.Certificate, what: str, at: dt.datetime) -> None:
    if at < cert.not_valid_before_utc:
        raise UntrustedSvidError(f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}")
    if at > cert.not_valid_after_utc:
        raise UntrustedSvidError(f"{what} expired at {cert.not_valid_after_utc.isoformat()}")


def _spiffe_id(cert: x509.Certificate, what: str) -> SpiffeId | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        return None
    if len(uris) > 1:
        raise InvalidSvidError(f"the {what} has {len(uris)} URI SANs; an X.509-SVID has exactly one (§2)")
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeIdError as err:
        raise InvalidSvidError(f"the {what}'s URI SAN is not a SPIFFE ID: {err}") from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _key_usage(cert: x509.Certificate, what: str) -> x509.KeyUsage:
    try:
        extension = cert.extensions.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        raise InvalidSvidError(f"the {what} has no key usage extension; every SVID must set it (§4.3)") from None
    if not extension.critical:
        raise InvalidSvidError(f"the {what}'s key usage extension must be marked critical (§4.3)")
    return extension.value


def _parse_private_key(data: bytes) -> PrivateKeyTypes:
    if not _PEM_BLOCK.search(data):
        raise InvalidSvidError("the key file is not PEM (no '-----BEGIN PRIVATE KEY-----' block)")
    block = next((m.group(0) for m in _PEM_BLOCK.finditer(data) if m.group(1) == b"PRIVATE KEY"), None)
    if block is None:
        raise InvalidSvidError("no PKCS#8 private key ('-----BEGIN PRIVATE KEY-----') found in the key file")
    try:
        return serialization.load_pem_private_key(block, password=None)
    except (ValueError, TypeError):
        # The parser's message could quote key material; say only what to check.
        raise InvalidSvidError("the private key is corrupt or encrypted; expected an unencrypted PKCS#8 key") from None


def _public_der(key: object) -> bytes:
    public_bytes = getattr(key, "public_bytes", None)
    if public_bytes is None:
        return b""
    der: bytes = public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


__all__ = [
    "X509Svid",
    "check_svid_rules",
    "load_x509_svid",
    "parse_certificates",
    "parse_x509_svid",
    "verify_x509_svid",
]
