"""SPIFFE trust bundles: the root certificates of one trust domain.

The wire form is the SPIFFE Trust Domain and Bundle spec's JWK set: one key per
root with ``use: "x509-svid"`` and exactly one certificate in ``x5c``, plus
``spiffe_sequence`` and ``spiffe_refresh_hint``. Keys of other uses are skipped,
as the spec requires of consumers. A PEM list of roots is accepted on import too.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from meshfed.errors import InvalidBundleError, InvalidSpiffeIdError
from meshfed.trust.ca import certificates_to_pem
from meshfed.trust.spiffe import SpiffeId, TrustDomain

DEFAULT_REFRESH_HINT_SECONDS = 300
_X509_SVID_USE = "x509-svid"
_JWT_SVID_USE = "jwt-svid"
_PEM_MARKER = b"-----BEGIN CERTIFICATE-----"
# RFC 7518 §6.1 key types; any other `kty` is skipped, not refused (SPIFFE bundle spec §4.2.1).
_KNOWN_KEY_TYPES = frozenset({"EC", "RSA", "oct", "OKP"})


@dataclass(frozen=True)
class TrustBundle:
    """The roots one zone trusts for one trust domain."""

    trust_domain: TrustDomain
    roots: tuple[x509.Certificate, ...]
    sequence: int = 1
    refresh_hint_seconds: int = DEFAULT_REFRESH_HINT_SECONDS
    # JWT-SVID authorities (JWKs with a ``kid``) are carried through untouched:
    # meshfed does not verify JWT-SVIDs, but must not drop a peer's keys when
    # it stores and re-serves a bundle.
    jwt_authorities: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.roots and not self.jwt_authorities:
            raise InvalidBundleError(f"bundle for {self.trust_domain} holds no authorities (no root certificate)")
        for root in self.roots:
            _require_ca(root)
            _require_publishable_key(root)

    def to_spiffe_json(self) -> bytes:
        """The SPIFFE bundle JSON document (pretty-printed for people and diffs)."""
        document = {
            "keys": [_jwk_of(root) for root in self.roots] + list(self.jwt_authorities),
            "spiffe_refresh_hint": self.refresh_hint_seconds,
            "spiffe_sequence": self.sequence,
        }
        return orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"

    def to_pem(self) -> bytes:
        """The roots as concatenated PEM blocks."""
        return b"".join(certificates_to_pem(self.roots))

    def fingerprints(self) -> list[str]:
        """SHA-256 fingerprints of the roots, hex."""
        return [fingerprint(root) for root in self.roots]

    def expired_roots(self, at: dt.datetime) -> list[x509.Certificate]:
        """Roots outside their validity period at ``at``: kept (a peer may renew them) but verifying nothing."""
        return [root for root in self.roots if not (root.not_valid_before_utc <= at <= root.not_valid_after_utc)]

    def with_roots(self, roots: Iterable[x509.Certificate]) -> TrustBundle:
        """This bundle plus ``roots`` (duplicates dropped); the sequence moves on only if the content changed."""
        merged = list(self.roots)
        known = set(self.fingerprints())
        for root in roots:
            if fingerprint(root) not in known:
                known.add(fingerprint(root))
                merged.append(root)
        return self._revised(tuple(merged))

    def without_roots(self, fingerprints: Iterable[str]) -> TrustBundle:
        """This bundle minus the roots with these SHA-256 fingerprints; the sequence moves on if any went."""
        dropped = set(fingerprints)
        return self._revised(tuple(root for root in self.roots if fingerprint(root) not in dropped))

    def same_content(self, other: TrustBundle) -> bool:
        """True if both hold the same authorities (order and sequence aside)."""
        return (
            self.trust_domain == other.trust_domain
            and sorted(self.fingerprints()) == sorted(other.fingerprints())
            and sorted(map(_canonical_json, self.jwt_authorities))
            == sorted(map(_canonical_json, other.jwt_authorities))
        )

    def _revised(self, roots: tuple[x509.Certificate, ...]) -> TrustBundle:
        if [fingerprint(root) for root in roots] == self.fingerprints():
            return self
        # SPIFFE bundle spec §4.1.1: the sequence MUST change whenever the contents change.
        return replace(self, roots=roots, sequence=self.sequence + 1)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint of a certificate's DER, lowercase hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def newest(held: TrustBundle | None, offered: TrustBundle) -> TrustBundle:
    """The bundle to keep when ``offered`` arrives for a domain that holds ``held``.

    A lower ``spiffe_sequence`` is stale (a lagging replica, a replay) and loses;
    an equal one is the same revision (spec §4.1.1), so re-fetching changes
    nothing. A publisher that sets no sequence at all (0 on both sides) is
    followed by content.
    """
    if held is None or offered.sequence > held.sequence:
        return offered
    if offered.sequence == held.sequence == 0 and not offered.same_content(held):
        return offered
    return held


def parse_bundle(trust_domain: TrustDomain, data: bytes, *, check_root_names: bool = True) -> TrustBundle:
    """Parse SPIFFE bundle JSON, or PEM roots, for ``trust_domain``.

    A root that names another trust domain (a SPIFFE URI SAN, or URI name
    constraints that exclude ``trust_domain``) is refused: it was handed over
    for the wrong domain, and trusting it here would let it vouch for names
    it was never meant to. ``check_root_names=False`` is for re-reading what
    a zone already stored, so a bundle taken in before the check existed
    stays readable (and is refused only when it is replaced).
    """
    if data.lstrip().startswith(_PEM_MARKER):
        return _parse_pem(trust_domain, data, check_root_names)
    return _parse_spiffe_json(trust_domain, data, check_root_names)


def _parse_pem(trust_domain: TrustDomain, data: bytes, check_root_names: bool) -> TrustBundle:
    try:
        roots = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise InvalidBundleError(f"bundle for {trust_domain}: PEM does not parse: {err}") from None
    for index, root in enumerate(roots):
        _require_intact(trust_domain, index, root)
        if check_root_names:
            _require_own_trust_domain(trust_domain, index, root)
    return TrustBundle(trust_domain, tuple(roots))


def _parse_spiffe_json(trust_domain: TrustDomain, data: bytes, check_root_names: bool) -> TrustBundle:
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as err:
        raise InvalidBundleError(f"bundle for {trust_domain} is neither PEM nor JSON: {err}") from None
    if not isinstance(document, dict):
        raise InvalidBundleError(f"bundle for {trust_domain}: expected a JSON object (a JWK set)")
    if "keys" not in document:
        # SPIFFE bundle spec §4.1.3: the `keys` parameter MUST be present.
        raise InvalidBundleError(f"bundle for {trust_domain} holds no authorities (no 'keys' member)")
    if not isinstance(document["keys"], list):
        raise InvalidBundleError(f"bundle for {trust_domain}: 'keys' must be a JSON array")
    roots: list[x509.Certificate] = []
    jwt_authorities: list[dict[str, Any]] = []
    for index, key in enumerate(document["keys"]):
        if not isinstance(key, dict):
            raise InvalidBundleError(f"bundle for {trust_domain}: keys[{index}] is not a JSON object")
        if not isinstance(key.get("kty"), str) or key.get("kty") not in _KNOWN_KEY_TYPES:
            # §4.2.1: `kty` MUST be set; a client meeting an unknown key type MUST ignore the whole element.
            continue
        if key.get("use") == _X509_SVID_USE:
            root = _root_of(trust_domain, index, key)
            if check_root_names:
                _require_own_trust_domain(trust_domain, index, root)
            roots.append(root)
        elif key.get("use") == _JWT_SVID_USE:
            if not isinstance(key.get("kid"), str) or not key["kid"]:
                raise InvalidBundleError(f"bundle for {trust_domain}: keys[{index}] (jwt-svid) has no 'kid'")
            jwt_authorities.append(key)
        # Keys of any other use are skipped: SPIFFE bundle spec §4.1 lets new uses appear.
    sequence = _non_negative_int(trust_domain, document, "spiffe_sequence", default=0)
    hint = _non_negative_int(trust_domain, document, "spiffe_refresh_hint", default=DEFAULT_REFRESH_HINT_SECONDS)
    return TrustBundle(trust_domain, tuple(roots), sequence, hint, tuple(jwt_authorities))


def _root_of(trust_domain: TrustDomain, index: int, key: dict[str, Any]) -> x509.Certificate:
    x5c = key.get("x5c")
    if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
        raise InvalidBundleError(
            f"bundle for {trust_domain}: keys[{index}] (x509-svid) must have exactly one certificate in 'x5c'"
        )
    try:
        root = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
    except (ValueError, binascii.Error) as err:
        raise InvalidBundleError(
            f"bundle for {trust_domain}: keys[{index}].x5c[0] is not a certificate: {err}"
        ) from None
    _require_intact(trust_domain, index, root)
    return root


def _require_intact(trust_domain: TrustDomain, index: int, root: x509.Certificate) -> None:
    # A self-issued root signs itself: a signature that fails means the bytes were altered
    # on the way (a root issued by someone else has nothing to check it against here).
    if root.issuer != root.subject:
        return
    try:
        root.verify_directly_issued_by(root)
    except (InvalidSignature, ValueError, TypeError):
        raise InvalidBundleError(
            f"bundle for {trust_domain}: keys[{index}] root's self-signature does not verify; the bundle was altered"
        ) from None


def _require_own_trust_domain(trust_domain: TrustDomain, index: int, root: x509.Certificate) -> None:
    """Refuse a root whose names say it belongs to another trust domain than the one it is taken in for."""
    subject = root.subject.rfc4514_string()[:128]
    for uri in _uri_sans(root):
        try:
            named = SpiffeId.parse(uri).trust_domain
        except InvalidSpiffeIdError:
            continue  # a URI SAN that is no SPIFFE ID names no trust domain
        if named != trust_domain:
            raise InvalidBundleError(
                f"bundle for {trust_domain}: keys[{index}] root {subject!r} is a root of {named} "
                f"(URI SAN {uri}), not of {trust_domain}; give it for {named} (--trust-domain {named})"
            )
    permitted = permitted_uri_hosts(root)
    if permitted is not None and not any(_host_within(trust_domain.name, base) for base in permitted):
        raise InvalidBundleError(
            f"bundle for {trust_domain}: keys[{index}] root {subject!r} has name constraints permitting URIs of "
            f"{', '.join(permitted)} only, so it can vouch for no SPIFFE ID of {trust_domain}; is it the right root?"
        )


def permitted_uri_hosts(cert: x509.Certificate) -> list[str] | None:
    """The hosts of a certificate's permitted URI name-constraint subtrees; None if it constrains no URIs."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    permitted = [
        name.value for name in constraints.permitted_subtrees or () if isinstance(name, x509.UniformResourceIdentifier)
    ]
    return permitted or None


def _host_within(host: str, base: str) -> bool:
    # RFC 5280 §4.2.1.10: "east.mesh" permits that host exactly; ".east.mesh" any host below it.
    host, base = host.lower(), base.lower()
    return host.endswith(base) if base.startswith(".") else host == base


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _non_negative_int(trust_domain: TrustDomain, document: dict[str, Any], field: str, default: int) -> int:
    value = document.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise InvalidBundleError(f"bundle for {trust_domain}: '{field}' must be a non-negative 64-bit integer")
    return value


def _require_ca(cert: x509.Certificate) -> None:
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise InvalidBundleError(f"bundle root {cert.subject.rfc4514_string()!r} is not a CA certificate")


def _require_publishable_key(cert: x509.Certificate) -> None:
    """Refuse a root whose key a SPIFFE bundle cannot carry here (an EC key on P-256/384/521), at parse time:
    a bundle taken in would otherwise fail only when it is stored or served."""
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _JWK_CURVES:
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise InvalidBundleError(
            f"bundle root {cert.subject.rfc4514_string()[:128]!r} has a {kind} key; meshfed takes EC roots on "
            "P-256, P-384 or P-521"
        )


def _jwk_of(root: x509.Certificate) -> dict[str, Any]:
    public_key = root.public_key()
    jwk: dict[str, Any] = {"use": _X509_SVID_USE}
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        size = (public_key.curve.key_size + 7) // 8
        numbers = public_key.public_numbers()
        jwk |= {
            "kty": "EC",
            "crv": _JWK_CURVES[public_key.curve.name],
            "x": _b64url(numbers.x.to_bytes(size, "big")),
            "y": _b64url(numbers.y.to_bytes(size, "big")),
        }
    else:
        raise InvalidBundleError(f"root {root.subject.rfc4514_string()!r} has a key type meshfed cannot publish")
    jwk["x5c"] = [base64.b64encode(root.public_bytes(Encoding.DER)).decode()]
    return jwk


def bundle_roots_pem(bundles: Sequence[TrustBundle]) -> dict[str, str]:
    """Map trust domain name → PEM trust anchors, the form the gateway config takes.

    A bundle with only JWT authorities can verify no X.509-SVID, so its trust
    domain gets no pool at all (its callers are refused at the handshake).
    Each root goes in as :func:`gateway_anchor` makes it.
    """
    return {
        bundle.trust_domain.name: b"".join(
            certificates_to_pem([gateway_anchor(bundle.trust_domain, root) for root in bundle.roots])
        ).decode()
        for bundle in bundles
        if bundle.roots
    }


def gateway_anchor(trust_domain: TrustDomain, root: x509.Certificate) -> x509.Certificate:
    """``root`` as the gateway's trust anchor for ``trust_domain``: without URI name constraints it enforces itself.

    rustls-webpki (0.103) implements no URI name constraints: it fails closed,
    refusing every certificate with a URI SAN below a CA whose constraints
    name URIs, so every SVID under a constrained root would be refused. A trust
    anchor is only a subject, a public key and constraints (RFC 5914; webpki
    reads just these from the certificate and checks no anchor signature), so
    the gateway gets a copy of the root with the same subject and key and
    without the permitted URI subtrees, when they permit ``trust_domain``:
    the gateway verifies a SPIFFE ID only against the pool of the ID's own
    trust domain, which is what those constraints ask. Any other constraint
    (DNS, IP, excluded URIs, URIs of other domains only) stays in, for webpki to
    apply or refuse. The copy's signature is by a throwaway key: nothing checks
    it, and it is no certificate anyone else sees (bundles and ``trust export``
    carry the root itself).
    """
    permitted = permitted_uri_hosts(root)
    if permitted is None or not any(_host_within(trust_domain.name, base) for base in permitted):
        return root
    return _anchor_without_uri_constraints(root.public_bytes(Encoding.DER))


@functools.lru_cache(maxsize=256)
def _anchor_without_uri_constraints(der: bytes) -> x509.Certificate:
    root = x509.load_der_x509_certificate(der)
    builder = (
        x509.CertificateBuilder()
        .subject_name(root.subject)
        .issuer_name(root.issuer)
        .public_key(root.public_key())
        .serial_number(root.serial_number)
        .not_valid_before(root.not_valid_before_utc)
        .not_valid_after(root.not_valid_after_utc)
    )
    for extension in root.extensions:
        value = extension.value
        if isinstance(value, x509.NameConstraints):
            permitted = [n for n in value.permitted_subtrees or () if not isinstance(n, x509.UniformResourceIdentifier)]
            if not permitted and not value.excluded_subtrees:
                continue
            value = x509.NameConstraints(permitted or None, value.excluded_subtrees)
        builder = builder.add_extension(value, extension.critical)
    return builder.sign(_anchor_signing_key(), hashes.SHA256())


@functools.cache
def _anchor_signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _canonical_json(value: dict[str, Any]) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_JWK_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
