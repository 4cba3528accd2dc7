"""Which names a peering may have: DNS labels, as they label metrics, imports and listeners."""

from __future__ import annotations

import re

from meshfed.errors import PeeringError

_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def check_peering_name(name: str, what: str = "a peering name") -> str:
    """Refuse a name that is not a DNS label (peering names label metrics, imports and listeners)."""
    if not _NAME.fullmatch(name):
        raise PeeringError(
            f"{what} {name[:80]!r} is not a DNS label: use lowercase letters, digits and '-', at most 63 "
            "characters (a zone's name, as 'meshfed zone init --name' gave it)"
        )
    return name


__all__ = ["check_peering_name"]
