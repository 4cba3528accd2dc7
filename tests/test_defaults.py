"""One definition of each default (``meshfed.defaults``): ``meshfed up``, its settings and the Helm chart agree."""

from __future__ import annotations

from pathlib import Path

import yaml

from meshfed import defaults
from meshfed.addresses import parse_host_port
from meshfed.cli.common import duration_text, parse_duration
from meshfed.runtime import ZoneSettings

VALUES = Path(__file__).parent.parent / "helm" / "meshfed" / "values.yaml"


def port_of(address: str) -> int:
    return parse_host_port(address, what="a default", allow_zero=True).port


def test_the_helm_chart_starts_a_zone_with_meshfeds_defaults() -> None:
    values = yaml.safe_load(VALUES.read_text())
    assert values["api"]["port"] == port_of(defaults.API_ADDRESS)
    assert values["gateway"]["port"] == port_of(defaults.GATEWAY_ADDRESS)
    assert values["gateway"]["egressPortBase"] == defaults.EGRESS_PORT_BASE
    assert values["peering"]["port"] == port_of(defaults.PEERING_ADDRESS)
    assert values["peering"]["establishPort"] == port_of(defaults.ESTABLISH_ADDRESS)
    assert parse_duration(values["zone"]["healthCheckInterval"]) == defaults.HEALTH_CHECK_INTERVAL
    assert parse_duration(values["zone"]["failingPeer"]["grace"]) == defaults.FAILING_PEER_GRACE
    assert values["zone"]["failingPeer"]["policy"] == defaults.FAILING_PEER_POLICY


def test_zone_settings_default_to_meshfeds_defaults() -> None:
    settings = ZoneSettings()
    assert settings.egress_port_base == defaults.EGRESS_PORT_BASE
    assert settings.egress_host == defaults.EGRESS_HOST
    assert (settings.peering_address, settings.establish_address) == (
        defaults.PEERING_ADDRESS,
        defaults.ESTABLISH_ADDRESS,
    )
    assert settings.failing_peer_grace == defaults.FAILING_PEER_GRACE
    assert settings.heartbeat_interval == defaults.HEARTBEAT_INTERVAL.total_seconds()


def test_a_default_duration_reads_back_as_itself() -> None:
    for duration in (defaults.FAILING_PEER_GRACE, defaults.HEALTH_CHECK_INTERVAL, defaults.HEARTBEAT_INTERVAL):
        assert parse_duration(duration_text(duration)) == duration
