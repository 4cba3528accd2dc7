"""Policy as the operator writes it: the value types of ``zone.toml``'s policy tables.

``[[authz]]``, ``[egress]``, ``[failover]`` and ``[[split]]`` are parsed here
into frozen, validated values at the edge. Nothing here holds state or talks to
a peer, so the zone's configuration (:mod:`meshfed.zone`) and the federation
that enforces the policies (:mod:`meshfed.federation`) both build on it.
"""
