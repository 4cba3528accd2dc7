"""Peers' gateway addresses as the data plane dials them: DNS names resolved, cached, failures named."""

from __future__ import annotations

from meshfed.federation.resolver import FAILED_TTL, RESOLVED_TTL, GatewayResolver, system_lookup


class Lookups:
    """A resolver's lookup that answers from a table and counts questions (the system resolver's stand-in)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host not in self.answers:
            raise OSError(f"[Errno -2] Name or service not known: {host}")
        return [f"{ip}:{port}" for ip in self.answers[host]]


def test_ip_literals_pass_through_and_names_resolve_once_per_ttl() -> None:
    now = [100.0]
    lookups = Lookups({"gw.east.example": ["10.0.0.7", "10.0.0.8"]})
    resolver = GatewayResolver(lookups, clock=lambda: now[0])

    found, problems = resolver.resolve(["192.0.2.1:15443", "[2001:db8::1]:15443", "gw.east.example:15443"])
    assert found == ["192.0.2.1:15443", "[2001:db8::1]:15443", "10.0.0.7:15443", "10.0.0.8:15443"]
    assert problems == []
    resolver.resolve(["gw.east.example:15443"])
    assert lookups.asked == ["gw.east.example"]  # cached
    now[0] += RESOLVED_TTL + 1
    resolver.resolve(["gw.east.example:15443"])
    assert lookups.asked == ["gw.east.example", "gw.east.example"]


def test_a_name_that_does_not_resolve_is_a_problem_not_an_endpoint() -> None:
    now = [0.0]
    lookups = Lookups({})
    resolver = GatewayResolver(lookups, clock=lambda: now[0])
    found, problems = resolver.resolve(["gone.example:15443", "192.0.2.1:15443", "192.0.2.1:15443"])
    assert found == ["192.0.2.1:15443"]
    assert len(problems) == 1
    assert "gone.example:15443 does not resolve" in problems[0]
    lookups.answers["gone.example"] = ["10.0.0.9"]
    assert resolver.resolve(["gone.example:15443"])[0] == []  # the failure is cached briefly
    now[0] += FAILED_TTL + 1
    assert resolver.resolve(["gone.example:15443"]) == (["10.0.0.9:15443"], [])


def test_the_system_lookup_resolves_localhost() -> None:
    assert "127.0.0.1:24091" in system_lookup("localhost", 24091)
