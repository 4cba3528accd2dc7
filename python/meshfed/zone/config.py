"""A zone's ``zone.toml``: what it may say, how it is read, and the document ``zone init`` writes.

:class:`ZoneConfig` is the file's model (name, trust domain, catalog, gateway
address and the policy tables); :func:`read_config` reads and validates it with
errors that name the file and the field, and :func:`check_identity` refuses a
file whose name or trust domain is not the one recorded in ``state.db`` (a zone
cannot be renamed or move to another trust domain). :func:`parse_refresh_hint`
and :func:`hint_seconds` check the bundle refresh hint ``zone.toml`` (or
``meshfed up --bundle-refresh-hint``) gives. Nothing here writes to the zone
directory except :func:`check_identity`, which records the identity of a zone
made before identities were recorded.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from pathlib import Path

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from meshfed import defaults
from meshfed.catalog.settings import CatalogMode, ConsulSettings, KubernetesSettings
from meshfed.errors import TrustError, ZoneError
from meshfed.policy.authz import RuleSpec
from meshfed.policy.egress import EgressPolicy
from meshfed.policy.failover import FailoverPolicy
from meshfed.policy.splits import SubsetSplit
from meshfed.runstate import STATE_FILE
from meshfed.store import StateStore
from meshfed.trust.spiffe import TrustDomain

CONFIG_FILE = "zone.toml"
_ZONE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class ZoneConfig(BaseModel):
    """The contents of ``zone.toml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    trust_domain: str
    catalog: CatalogMode = "embedded"
    gateway_address: str = defaults.GATEWAY_ADDRESS
    # [failover]: the order (and any weighted split) in which failover groups try peers after local endpoints.
    failover: FailoverPolicy = FailoverPolicy()
    # [[split]]: exported services whose peers' traffic is divided among subsets by weight.
    split: list[SubsetSplit] = Field(default_factory=list)
    # [[authz]]: ordered allow/deny rules over caller SPIFFE IDs per exported service (federation/authz.py).
    authz: list[RuleSpec] = Field(default_factory=list)
    # [egress]: whether local workloads must present SVIDs to the egress listeners (policy/egress.py).
    egress: EgressPolicy = EgressPolicy()
    # The spiffe_refresh_hint of this zone's bundle, such as "5m" (meshfed up --bundle-refresh-hint overrides it).
    bundle_refresh_hint: str | None = None
    # Settings of the consul / kubernetes catalog sources ([consul], [kubernetes] in zone.toml).
    consul: ConsulSettings | None = None
    kubernetes: KubernetesSettings | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _ZONE_NAME.fullmatch(value):
            raise ValueError("a zone name is a DNS label: lowercase letters, digits and '-', at most 63 characters")
        return value

    @field_validator("trust_domain")
    @classmethod
    def _check_trust_domain(cls, value: str) -> str:
        try:
            return TrustDomain.parse(value).name
        except TrustError as err:
            raise ValueError(str(err)) from None

    @field_validator("bundle_refresh_hint")
    @classmethod
    def _check_refresh_hint(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_refresh_hint(value)
            except TrustError as err:
                raise ValueError(str(err)) from None
        return value


def new_config(
    name: str,
    trust_domain: str,
    catalog: CatalogMode,
    consul: ConsulSettings | None,
    kubernetes: KubernetesSettings | None,
) -> ZoneConfig:
    """The config ``zone init`` makes, or a :class:`ZoneError` naming the first bad field."""
    try:
        return ZoneConfig(name=name, trust_domain=trust_domain, catalog=catalog, consul=consul, kubernetes=kubernetes)
    except ValidationError as err:
        raise ZoneError(_first_validation_error(err)) from None


def read_config(directory: Path) -> ZoneConfig:
    """Read and validate ``directory``'s ``zone.toml``, with errors that say which file is wrong."""
    path = directory / CONFIG_FILE
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ZoneError(f"{directory} is not a zone directory (no {CONFIG_FILE}); run 'meshfed zone init'") from None
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ZoneError(f"cannot read {path}: {err}") from None
    try:
        return ZoneConfig.model_validate(raw)
    except ValidationError as err:
        raise ZoneError(f"{path}: {_first_validation_error(err)}") from None


def check_identity(directory: Path, config: ZoneConfig) -> None:
    """zone.toml's ``name`` and ``trust_domain`` must be the zone's own: its CA, SVIDs and peerings are theirs.

    A renamed zone would present SVIDs its peers pin under the old name, and a
    new trust domain has no CA at all; refuse at open, in one line, rather than
    fail later in every gateway config and peering stream.
    """
    path = directory / CONFIG_FILE
    with StateStore(directory / STATE_FILE) as store:
        recorded = store.identity()
        if recorded is None:  # a zone made before identities were recorded: its own bundle says its domain
            own = {stored.bundle.trust_domain.name for stored in store.bundles() if stored.source == "self"}
            if len(own) != 1:
                return  # not a zone this version can vouch for; the CA checks say what is wrong
            recorded = (config.name, own.pop())
            if recorded[1] == config.trust_domain:
                store.record_identity(*recorded)
    name, trust_domain = recorded
    if config.trust_domain != trust_domain:
        raise ZoneError(
            f"{path}: trust_domain is {config.trust_domain!r}, but this zone's CA, SVIDs and peerings are "
            f"{trust_domain!r}; a zone cannot change its trust domain: put {trust_domain!r} back, or make a new "
            "zone with 'meshfed zone init' (and peer it anew)"
        )
    if config.name != name:
        raise ZoneError(
            f"{path}: name is {config.name!r}, but this zone was created as {name!r} and its peers know it by "
            f"that name; a zone cannot be renamed: put {name!r} back, or make a new zone with 'meshfed zone init'"
        )


def hint_seconds(hint: dt.timedelta) -> int:
    """``hint`` as whole seconds, if it is within the refresh hint's range."""
    seconds = int(hint.total_seconds())
    if not MIN_REFRESH_HINT <= hint <= MAX_REFRESH_HINT or seconds != hint.total_seconds():
        raise TrustError(
            f"a bundle refresh hint of {hint} is out of range; give whole seconds from "
            f"{int(MIN_REFRESH_HINT.total_seconds())}s to {MAX_REFRESH_HINT.days}d"
        )
    return seconds


def parse_refresh_hint(text: str, what: str = "bundle_refresh_hint") -> int:
    """``90s``, ``5m``, ``1h``, ``1d`` or a sum like ``1h30m`` as whole seconds, within the hint's range."""
    parts = _DURATION.findall(text)
    if not text or "".join(number + unit for number, unit in parts) != text:
        raise TrustError(f"{what} {text!r} is not a duration; use forms like 90s, 5m, 1h, 1d")
    try:
        return hint_seconds(dt.timedelta(seconds=sum(int(number) * _UNITS[unit] for number, unit in parts)))
    except TrustError as err:
        raise TrustError(f"{what} {text!r}: {err}") from None


_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Below a second consumers would poll in a loop; over a week a rotation's overlap (3 hints) gets absurd.
MIN_REFRESH_HINT = dt.timedelta(seconds=1)
MAX_REFRESH_HINT = dt.timedelta(days=7)


# Appended to the zone.toml that `zone init` writes: the optional tables, ready to uncomment.
_OPTIONAL_TABLES = """
# Optional tables: uncomment to use. `meshfed up` reads this file at start; a running zone also
# applies changes to [failover], [[split]] and [[authz]]. Top-level keys go above the first table.
#
# [failover]                        # the order in which failover groups try peers after local endpoints
# order = ["east", "north"]
# split = {east = 90, north = 10}   # or: peers sharing one tier by weight
#
# [[split]]                         # divide peers' traffic to an exported service among its subsets
# service = "web"
# label = "version"
# weights = {v1 = 90, v2 = 10}
#
# [[authz]]                         # who may call an exported service; the first matching rule decides
# service = "web"
# action = "allow"
# id = "spiffe://west.mesh/ns/shop/*"
#
# [egress]                          # what local workloads must present to the egress listeners
# workload_tls = "strict"           # plain (default), permissive or strict
"""


def config_document(config: ZoneConfig) -> str:
    """What ``zone init`` writes to ``zone.toml``: the settings that differ from a default, then examples.

    A table or list at its default is left out rather than written empty: ``[failover]`` or
    ``authz = []`` in the file would make an operator's own ``[failover]`` or ``[[authz]]`` a
    TOML error. The zone's name, trust domain, catalog and gateway address are always written.
    """
    document = config.model_dump(exclude_none=True, by_alias=True)
    defaults = ZoneConfig.model_construct().model_dump(exclude_none=True, by_alias=True)
    always = {"name", "trust_domain", "catalog", "gateway_address"}
    kept = {key: value for key, value in document.items() if key in always or value != defaults.get(key)}
    return tomli_w.dumps(kept) + _OPTIONAL_TABLES


def _first_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "config"
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{field}: {message}"
