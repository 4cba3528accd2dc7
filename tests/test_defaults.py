"""One definition of each default (``meshfed.defaults``): ``meshfed up``, its settings and the Helm chart agree."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from meshfed import defaults
from meshfed.addresses import parse_host_port
from meshfed.cli import app as cli
from meshfed.cli.common import duration_text, parse_duration
from meshfed.cli.up import up
from meshfed.runtime import ZoneSettings
from meshfed.zone import Zone

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
    assert settings.controller.egress_port_base == defaults.EGRESS_PORT_BASE
    assert settings.controller.egress_host == defaults.EGRESS_HOST
    assert (settings.peering.listen_address, settings.peering.establish_address) == (
        defaults.PEERING_ADDRESS,
        defaults.ESTABLISH_ADDRESS,
    )
    assert settings.controller.failing_peer_grace == defaults.FAILING_PEER_GRACE
    assert settings.peering.heartbeat_interval == defaults.HEARTBEAT_INTERVAL.total_seconds()


# The parts of ZoneSettings that are a component's settings, whole; their fields are named "part.field" below.
SETTINGS_PARTS = ("controller", "peering")
# Fields of the settings objects that `meshfed up` has no flag for: each keeps its default in a running zone.
NOT_FLAGS = (
    "controller.gateway_svid_ttl",  # renewed at half its life: an operator gains nothing by changing it
    "controller.publication_resync",  # a safety net behind the publish on every change, not a knob
    "peering.heartbeat_interval",  # shortened by tests, the demo and benchmarks; 5 s suits a deployment
    "peering.missed_heartbeats",  # with the interval, the failure deadline; tests shorten it
    "peering.peer_heartbeat_bounds",  # a hostile peer's clamp: the same for every zone
    "peering.store_poll_interval",  # how soon the CLI's peering changes land; POST /v1/peerings/refresh is at once
    "peering.reconnect_backoff",  # the dialer's backoff: tests shorten it
    "peering.limits",  # what one peer may make a zone hold: the same for every zone
)
# Flags named otherwise than their field (any other flag is the field's name, dashed).
FLAGS_OF = {
    "peering.listen_address": ("--peering-address",),
    "controller.health_check": ("--health-check-interval",),
    "bundle_endpoint_port": ("--bundle-endpoint-port", "--bundle-endpoint-address"),
    "bundle_endpoint_host": ("--bundle-endpoint-address",),
    "bundle_endpoint_web": ("--bundle-endpoint-web-cert", "--bundle-endpoint-web-key"),
    "leader": ("--leader-lease", "--leader-lock", "--leader-identity"),
    "replica": ("--state-secret", "--state-kv"),
    "token_files": ("--admin-token-file", "--read-token-file"),
}


def _settings_fields(settings: ZoneSettings) -> dict[str, Any]:
    """Every field of ``settings`` and of its parts, by name ("part.field" in a part), with its value."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if field.name in SETTINGS_PARTS:
            values |= {f"{field.name}.{inner.name}": getattr(value, inner.name) for inner in dataclasses.fields(value)}
        else:
            values[field.name] = value
    return values


def _up_flags() -> set[str]:
    single = typer.Typer()
    single.command("up")(up)
    return {flag for param in typer.main.get_command(single).params for flag in param.opts}


def test_every_setting_has_a_meshfed_up_flag_or_says_why_not() -> None:
    fields = _settings_fields(ZoneSettings())
    assert set(NOT_FLAGS) <= set(fields), "NOT_FLAGS names a field that is gone"
    assert set(FLAGS_OF) <= set(fields) - set(NOT_FLAGS), "FLAGS_OF names a field that is gone or has no flag"
    flags = _up_flags()
    for name in set(fields) - set(NOT_FLAGS):
        wanted = FLAGS_OF.get(name, ("--" + name.rpartition(".")[2].replace("_", "-"),))
        assert set(wanted) <= flags, f"{name}: no `meshfed up` flag {wanted}; add one, or the field to NOT_FLAGS"


def test_meshfed_up_without_flags_runs_with_the_settings_defaults(
    make_zone: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each flag's default is its field's: `meshfed up` with none builds ``ZoneSettings()``, field by field."""
    zone: Zone = make_zone("east")
    built: list[ZoneSettings] = []
    monkeypatch.setattr("meshfed.cli.serve.serve_zone", lambda _zone, settings, *_, **__: built.append(settings))
    monkeypatch.setattr("faulthandler.enable", lambda: None)  # the runner's stderr has no file descriptor
    result = CliRunner().invoke(cli, ["up", "--dir", str(zone.directory)])
    assert result.exit_code == 0, result.output
    (settings,) = built
    expected = _settings_fields(ZoneSettings())
    for name, value in _settings_fields(settings).items():
        assert value == expected[name], (
            f"{name}: `meshfed up` gives {value!r}, the field's default is {expected[name]!r}"
        )
    assert settings == ZoneSettings()


def test_a_default_duration_reads_back_as_itself() -> None:
    for duration in (defaults.FAILING_PEER_GRACE, defaults.HEALTH_CHECK_INTERVAL, defaults.HEARTBEAT_INTERVAL):
        assert parse_duration(duration_text(duration)) == duration
