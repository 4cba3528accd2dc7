"""A zone's certificate authority: a root, an intermediate, and X.509-SVIDs.

The root signs only the intermediate (path length 1); the intermediate signs
SVIDs (path length 0). Keys are ECDSA P-256. SVIDs follow the X.509-SVID spec:
exactly one URI SAN holding the SPIFFE ID, not a CA, ``digitalSignature`` key
usage, both TLS client and server EKUs so one SVID serves both ends of mTLS.

The root carries X.509 name constraints (critical, RFC 5280 §4.2.1.10)
permitting URI names of its own trust domain only: a consumer that checks
them (OpenSSL, BoringSSL in gRPC, Go's crypto/x509 in SPIRE) refuses anything
the root would sign for another trust domain, even from a merged root pool.
Constraints apply to the whole path below the root, so the intermediate needs
none of its own, and it must have none: rustls-webpki (0.103, the gateway's
verifier) implements no URI constraints and fails closed on any it meets on
a path (a leaf's URI SAN never "matches" a permitted URI subtree), so an SVID
under a constrained intermediate is refused by every meshfed gateway. The
root's constraints reach webpki as the trust anchor's, which the gateway is
given without them (:func:`meshfed.trust.bundle.bundle_roots_pem`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshfed.errors import TrustError
from meshfed.trust.spiffe import SpiffeId, TrustDomain

ROOT_VALIDITY = dt.timedelta(days=3650)
INTERMEDIATE_VALIDITY = dt.timedelta(days=365)
DEFAULT_SVID_TTL = dt.timedelta(hours=24)
# Tolerates modest clock skew between zones: a fresh SVID is already valid on
# a peer whose clock runs a little behind.
_BACKDATE = dt.timedelta(seconds=60)


@dataclass(frozen=True)
class Svid:
    """An X.509-SVID with its private key and the chain up to (not including) the root."""

    spiffe_id: SpiffeId
    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    private_key: ec.EllipticCurvePrivateKey

    def cert_chain_pem(self) -> bytes:
        """The leaf, then the intermediates, as PEM."""
        return b"".join(certificates_to_pem((self.leaf, *self.intermediates)))

    def private_key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM; write it only to 0600 files."""
        return private_key_to_pem(self.private_key)


@dataclass(frozen=True)
class CertificateAuthority:
    """The signing half of a zone's CA: the intermediate and its key, with the root it chains to."""

    trust_domain: TrustDomain
    root: x509.Certificate
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey

    def issue(self, spiffe_id: SpiffeId, ttl: dt.timedelta = DEFAULT_SVID_TTL, dns_names: Sequence[str] = ()) -> Svid:
        """Issue an X.509-SVID for ``spiffe_id``, valid for ``ttl`` (capped by the intermediate).

        ``dns_names`` adds DNS SANs beside the one URI SAN (the X.509-SVID spec
        allows them): TLS stacks that insist on a host name check, such as
        gRPC's, need one on a server certificate.
        """
        if spiffe_id.trust_domain != self.trust_domain:
            raise TrustError(f"cannot issue {spiffe_id}: it is outside this zone's trust domain {self.trust_domain}")
        if not spiffe_id.path:
            raise TrustError(f"cannot issue {spiffe_id}: a workload SPIFFE ID needs a path")
        if ttl <= dt.timedelta(0):
            raise TrustError(f"SVID TTL must be positive, got {ttl}")
        now = _now()
        not_after = min(now + ttl, self.intermediate.not_valid_after_utc)
        if not_after <= now:
            raise TrustError("the zone's intermediate CA has expired; rotate the zone's CA")
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            _builder(
                _name(_common_name("", self.trust_domain, " workload")),
                self.intermediate.subject,
                key,
                now - _BACKDATE,
                not_after,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(str(spiffe_id)), *map(x509.DNSName, dns_names)]
                ),
                critical=False,
            )
            .add_extension(_authority_key_id(self.intermediate), critical=False)
            .sign(self.intermediate_key, hashes.SHA256())
        )
        return Svid(spiffe_id, leaf, (self.intermediate,), key)


@dataclass(frozen=True)
class NewAuthority:
    """A freshly created CA. The root key is here only so the caller can store it."""

    authority: CertificateAuthority
    root_key: ec.EllipticCurvePrivateKey


def create_authority(trust_domain: TrustDomain, generation: int = 0) -> NewAuthority:
    """Create a self-signed root and an intermediate for ``trust_domain``.

    ``generation`` (0 for a new zone, then one more per rotation) goes into the
    names, so operators and path builders tell the old and new roots apart.
    """
    now = _now()
    root_key = ec.generate_private_key(ec.SECP256R1())
    suffix = f" g{generation}" if generation else ""
    root_name = _name(_common_name("meshfed root CA ", trust_domain, suffix))
    root = (
        _builder(root_name, root_name, root_key, now - _BACKDATE, now + ROOT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(_trust_domain_san(trust_domain), critical=False)
        .add_extension(trust_domain_name_constraints(trust_domain), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    return NewAuthority(create_intermediate(trust_domain, root, root_key, generation), root_key)


def create_intermediate(
    trust_domain: TrustDomain, root: x509.Certificate, root_key: ec.EllipticCurvePrivateKey, generation: int
) -> CertificateAuthority:
    """A new intermediate signed by ``root`` (whose private key is ``root_key``), named for ``generation``."""
    if _public_der(root_key.public_key()) != _public_der(root.public_key()):
        raise TrustError(f"the root key given is not the key of the root {root.subject.rfc4514_string()!r}")
    now = _now()
    if root.not_valid_after_utc <= now:
        raise TrustError(f"the root {root.subject.rfc4514_string()!r} has expired; rotate to a new root")
    suffix = f" g{generation}" if generation else ""
    intermediate_key = ec.generate_private_key(ec.SECP256R1())
    intermediate = (
        _builder(
            _name(_common_name("meshfed intermediate CA ", trust_domain, suffix)),
            root.subject,
            intermediate_key,
            now - _BACKDATE,
            min(now + INTERMEDIATE_VALIDITY, root.not_valid_after_utc),
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(_trust_domain_san(trust_domain), critical=False)
        .add_extension(_authority_key_id(root), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    return CertificateAuthority(trust_domain, root, intermediate, intermediate_key)


def trust_domain_name_constraints(trust_domain: TrustDomain) -> x509.NameConstraints:
    """Permit URI names whose host is ``trust_domain`` (every ``spiffe://<td>/...``) and nothing else of that form.

    RFC 5280 matches a URI constraint against the URI's host: ``east.mesh``
    permits ``spiffe://east.mesh/...`` but neither ``spiffe://west.mesh/...``
    nor ``spiffe://a.east.mesh/...`` (that would take ``.east.mesh``). Other
    name forms (the DNS SANs gRPC wants on a server SVID) stay unconstrained.
    """
    return x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain.name)], excluded_subtrees=None
    )


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID in a certificate's single URI SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise TrustError("certificate has no subject alternative name, so no SPIFFE ID") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise TrustError(f"an X.509-SVID has exactly one URI SAN; this certificate has {len(uris)}")
    return SpiffeId.parse(uris[0])


def certificates_to_pem(certs: tuple[x509.Certificate, ...] | list[x509.Certificate]) -> list[bytes]:
    """Each certificate as one PEM block."""
    return [cert.public_bytes(serialization.Encoding.PEM) for cert in certs]


def private_key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """An unencrypted PKCS#8 PEM private key."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key_pem(data: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    """Load an EC private key, naming ``what`` in the error if it is not one."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise TrustError(f"{what} is not a readable PEM private key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TrustError(f"{what} is not an EC private key")
    return key


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


# X.509 caps a common name at 64 characters (RFC 5280 ub-common-name); trust domains run to 255.
_MAX_COMMON_NAME = 64


def _common_name(prefix: str, trust_domain: object, suffix: str) -> str:
    """``prefix + trust domain + suffix`` within 64 characters: the trust domain is cut (with '~'), never the
    generation suffix, so the names of two generations' CAs always differ. The SPIFFE ID, in the URI SAN,
    names the trust domain in full."""
    name = str(trust_domain)
    room = _MAX_COMMON_NAME - len(prefix) - len(suffix)
    if len(name) > room:
        name = name[: room - 1] + "~"
    return f"{prefix}{name}{suffix}"


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshfed"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _trust_domain_san(trust_domain: TrustDomain) -> x509.SubjectAlternativeName:
    # X.509-SVID spec §2: a signing certificate may carry its trust domain's ID.
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain.id))])


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
