"""X.509-SVIDs from files: parse, check the X.509-SVID rules, verify against a trust domain's bundle.

Three separate steps, because callers need them separately:

* :func:`parse_x509_svid` reads PEM certificates and a PKCS#8 key (one file or
  two, in either order) and checks that the key belongs to the leaf;
* :func:`check_svid_rules` applies the X.509-SVID spec's rules (§3, §4, §5.2)
  to a chain, leaf first, and returns the leaf's SPIFFE ID;
* :func:`verify_x509_svid` has ``cryptography``'s X.509 verifier build and
  check a path to a root of the bundle of *the leaf's own trust domain*
  (never a merged pool: federation spec §4.2) at a given time.

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
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from meshfed.errors import InvalidSpiffeIdError, InvalidSvidError, UntrustedSvidError
from meshfed.trust.bundle import TrustBundle, gateway_anchor
from meshfed.trust.spiffe import SpiffeId, TrustDomain

# RFC 5280 allows longer paths; SPIFFE deployments use one or two intermediates.
# The cap (intermediates between leaf and root) bounds the work an attacker-supplied chain can cause.
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
    the leaf's own trust domain's roots are ever tried. ``chain[1:]`` may come
    in any order and may hold the matching root: the path is built from it.

    Path validation (signatures, validity dates of every certificate, path
    length, basic constraints, key usage, name constraints) is
    ``cryptography``'s RFC 5280 verifier; only the SPIFFE profile on top of it
    (:func:`check_svid_rules`, the choice of bundle, which EKUs a leaf may
    carry) is meshfed's.
    """
    spiffe_id = check_svid_rules(chain)
    domain = spiffe_id.trust_domain
    bundle = bundles(domain) if callable(bundles) else bundles.get(domain)
    if bundle is None or not bundle.roots:
        raise UntrustedSvidError(f"{spiffe_id}: this zone trusts no X.509 roots of {domain}; import its bundle")
    # Roots go in as the gateway takes them (gateway_anchor): the library implements no URI name
    # constraints and refuses any it meets, so a root's own-domain URI subtrees are dropped from the
    # anchor. Taking roots from the leaf's own domain's bundle alone is what those subtrees ask for.
    anchors = [gateway_anchor(domain, root) for root in bundle.roots]
    # A presented copy of a bundle root adds nothing (the anchor stands for it) and, taken as an
    # untrusted intermediate with its URI constraints, would only bury the real reason for a refusal.
    intermediates = [cert for cert in chain[1:] if cert not in bundle.roots]
    verifier = (
        PolicyBuilder()
        .store(Store(anchors))
        .time(at)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_LEAF_POLICY)
        # A client verifier, because a server one must match a DNS name or IP, which an SVID need not
        # carry; the leaf's EKU is checked by _LEAF_POLICY, not by the client verifier's clientAuth default.
        .build_client_verifier()
    )
    try:
        verifier.verify(chain[0], intermediates)
    except VerificationError as err:
        reason = _explain(str(err), chain, bundle.roots, domain, at)
        raise UntrustedSvidError(f"{spiffe_id} does not verify against the bundle of {domain}: {reason}") from None
    return spiffe_id


# X.509-SVID §4.4: a leaf's EKU, when present, names TLS server and client authentication (the spec has
# issuers set both; meshfed's CA and SPIRE do). This verifier does not know which end of mTLS an SVID is
# presented on, so it asks for at least one of the two: a certificate whose EKU names only other purposes
# (codeSigning, say, or only anyExtendedKeyUsage) was minted for another job and is refused.
_LEAF_PURPOSES = frozenset({ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH})
# On a CA, an EKU limits what it may sign for (RFC 5280 §4.2.1.12 as Go and the library read it), with
# anyExtendedKeyUsage meaning no limit.
_CA_PURPOSES = _LEAF_PURPOSES | {ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
_EKU_NAMES = {oid: name for name, oid in vars(ExtendedKeyUsageOID).items() if isinstance(oid, x509.ObjectIdentifier)}


def _leaf_purpose(_policy: Policy, _cert: x509.Certificate, usage: x509.ExtendedKeyUsage | None) -> None:
    if usage is not None and not _LEAF_PURPOSES.intersection(usage):
        raise ValueError(f"the leaf's extended key usage ({_eku_names(usage)}) has neither serverAuth nor clientAuth")


def _ca_purpose(_policy: Policy, cert: x509.Certificate, usage: x509.ExtendedKeyUsage | None) -> None:
    if usage is not None and not _CA_PURPOSES.intersection(usage):
        raise ValueError(
            f"CA {cert.subject.rfc4514_string()!r} has extended key usage ({_eku_names(usage)}) that allows "
            "neither serverAuth nor clientAuth below it"
        )


def _eku_names(usage: x509.ExtendedKeyUsage) -> str:
    return ", ".join(_EKU_NAMES.get(oid, oid.dotted_string) for oid in usage)


# The library's Web PKI profiles with SPIFFE relaxations: an EKU of any criticality holding serverAuth as well
# as clientAuth (one SVID serves both ends of mTLS), and no required authority key identifier on the leaf (the
# X.509-SVID spec asks for none; go-spiffe's reference SVIDs carry none). Everything else stays: the leaf may
# not be a CA nor carry name constraints, each CA needs critical basicConstraints and keyCertSign.
_LEAF_POLICY = (
    ExtensionPolicy.webpki_defaults_ee()
    .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _leaf_purpose)
    .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
)
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca().may_be_present(
    x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ca_purpose
)
_LIBRARY_PREFIXES = ("validation failed: ", "candidates exhausted: ", "Python extension validator failed: ValueError: ")
_ENCOUNTERED = re.compile(r"\s*\(encountered processing <Certificate\(.*$", re.DOTALL)


def _explain(
    text: str,
    chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    domain: TrustDomain,
    at: dt.datetime,
) -> str:
    """The library's reason as one line a reader can act on."""
    for prefix in _LIBRARY_PREFIXES:
        text = text.removeprefix(prefix)
    # The library names the certificate by an elided repr; the explanations below name it properly.
    text = " ".join(_ENCOUNTERED.sub("", text).split())
    if "not valid at validation time" in text:
        for what, cert in _described(chain, roots, domain):
            if at < cert.not_valid_before_utc:
                return f"{what} is not valid before {cert.not_valid_before_utc.isoformat()} (check the clocks)"
            if at > cert.not_valid_after_utc:
                return f"{what} expired at {cert.not_valid_after_utc.isoformat()}"
    if text == "path length constraint violated":
        return "a CA on the path has more CAs below it than its basicConstraints path length allows"
    if text == "unsupported name constraint":
        return (
            "a CA on the path has URI name constraints; only a root's constraints permitting "
            f"{domain} are understood (intermediates must carry none, as for the gateway)"
        )
    if text in ("all candidates exhausted with no interior errors", ""):
        return (
            f"no path from the leaf (issuer {chain[0].issuer.rfc4514_string()!r}) to any of its roots; "
            "is the bundle current, and does the peer send its intermediates?"
        )
    return text


def _described(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], domain: TrustDomain
) -> list[tuple[str, x509.Certificate]]:
    named = [("the leaf", chain[0])]
    named += [(f"signing certificate {c.subject.rfc4514_string()!r}", c) for c in chain[1:] if c not in roots]
    return named + [(f"root {root.subject.rfc4514_string()!r} of {domain}", root) for root in roots]


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
