"""The names peering code took from here before the peering module was split by role.

New code imports from the owners: the states and the stored row from
:mod:`meshfed.federation.peering_state`, the store from
:mod:`meshfed.federation.peering_store` (its tables in
:mod:`meshfed.federation.peering_schema`), the token rules from
:mod:`meshfed.federation.peering_tokens` and the name check from
:mod:`meshfed.federation.peering_names`.
"""

from __future__ import annotations

from meshfed.federation.peering_names import check_peering_name
from meshfed.federation.peering_state import EXPIRED_PENDING_KEPT, LIVE_STATES, Listener, Peering, PeerState
from meshfed.federation.peering_store import PeeringStore, request_delete
from meshfed.federation.peering_tokens import IssuedToken

__all__ = [
    "EXPIRED_PENDING_KEPT",
    "LIVE_STATES",
    "IssuedToken",
    "Listener",
    "PeerState",
    "Peering",
    "PeeringStore",
    "check_peering_name",
    "request_delete",
]
