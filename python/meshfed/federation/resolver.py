"""Peers' gateway addresses as the data plane dials them: ``ip:port``.

A peer may advertise its gateway by DNS name (``gw.east.example:15443``) — an
honest choice behind a load balancer — while the Rust data plane dials socket
addresses only. Names are resolved here, when a gateway config is built, and
cached for a short while so a config of thousands of imports costs one lookup
per distinct name. A name that does not resolve yields no endpoint and a
problem naming it; it never fails the config.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Sequence

from meshfed.addresses import parse_host_port
from meshfed.errors import MeshfedError

# How long an answer (or a failure) is reused before asking again.
RESOLVED_TTL = 30.0
FAILED_TTL = 5.0

Lookup = Callable[[str, int], list[str]]


def system_lookup(host: str, port: int) -> list[str]:
    """``ip:port`` for every stream address ``host`` resolves to (the system resolver)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({_socket_address(str(info[4][0]), port) for info in infos})


class GatewayResolver:
    """Resolves advertised gateway addresses, with a small cache; thread-safe enough for one builder."""

    def __init__(self, lookup: Lookup = system_lookup, clock: Callable[[], float] = time.monotonic) -> None:
        self._lookup = lookup
        self._clock = clock
        self._cache: dict[str, tuple[float, list[str], str]] = {}

    def resolve(self, addresses: Sequence[str]) -> tuple[list[str], list[str]]:
        """The socket addresses behind ``addresses``, in order without repeats, and one problem per failure."""
        resolved: dict[str, None] = {}
        problems: list[str] = []
        for address in addresses:
            found, problem = self._one(address)
            resolved.update(dict.fromkeys(found))
            if problem:
                problems.append(problem)
        return list(resolved), problems

    def _one(self, address: str) -> tuple[list[str], str]:
        try:
            parsed = parse_host_port(address, what="gateway address", allow_zero=False)
        except MeshfedError as err:
            return [], str(err)
        try:
            ipaddress.ip_address(parsed.host)
        except ValueError:
            pass
        else:
            return [_socket_address(parsed.host, parsed.port)], ""
        now = self._clock()
        cached = self._cache.get(address)
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]
        try:
            found, problem = self._lookup(parsed.host, parsed.port), ""
        except OSError as err:
            found, problem = [], f"gateway address {address} does not resolve: {err}"
        if not found and not problem:
            problem = f"gateway address {address} resolves to no address"
        self._cache[address] = (now + (RESOLVED_TTL if found else FAILED_TTL), found, problem)
        return found, problem


def _socket_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


__all__ = ["GatewayResolver", "system_lookup"]
