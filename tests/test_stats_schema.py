"""The gateway's stats document is typed once: the Rust types write it, the Python types and metrics read it.

``_core.gateway_stats_schema()`` is the JSON Schema schemars derives from the
Rust snapshot types. Each is paired with its ``TypedDict`` in
``meshfed.gateway.stats``, and every field a metric reads is checked to exist,
so a field renamed or dropped on either side fails here rather than silently
dropping a metric. A real gateway's document is checked against the types.
"""

from __future__ import annotations

import json
import socket
import typing
from typing import Any

import pytest

from meshfed import _core
from meshfed.gateway import Gateway, stats
from meshfed.gateway.sni import service_sni
from meshfed.telemetry.gateway_metrics import CLUSTER_HISTOGRAMS, GATEWAY_METRICS, Field
from tests.conftest import round_trip, trust_each_other
from tests.test_gateway import _egress, _ingress

# Rust type name -> the TypedDict that mirrors it.
PAIRS: dict[str, type] = {
    "StatsDocument": stats.StatsDocument,
    "ListenerSnapshot": stats.ListenerStats,
    "RouteSnapshot": stats.RouteStats,
    "HistogramSnapshot": stats.HistogramStats,
    "ClusterSnapshot": stats.ClusterStats,
    "EndpointSnapshot": stats.EndpointStats,
}
JSON_TYPES = {int: "integer", bool: "boolean", dict: "object", list: "array"}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(_core.gateway_stats_schema())
    return document


def _object(schema: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = schema if schema.get("title") == name else schema["$defs"][name]
    return found


def _json_type(schema: dict[str, Any], node: dict[str, Any]) -> str:
    if "$ref" in node:
        return str(_object(schema, node["$ref"].rsplit("/", 1)[1]).get("type", "object"))
    kind = node["type"]
    return str(kind[0] if isinstance(kind, list) else kind)


def _python_type(annotation: object) -> str:
    origin = typing.get_origin(annotation) or annotation
    if typing.is_typeddict(origin):
        return "object"
    return JSON_TYPES[origin]  # type: ignore[index]


@pytest.mark.parametrize("rust_name", PAIRS)
def test_each_typed_dict_has_exactly_the_rust_fields_with_their_json_types(schema, rust_name):
    rust = _object(schema, rust_name)
    python = typing.get_type_hints(PAIRS[rust_name])
    assert set(python) == set(rust["properties"]), f"{rust_name} and {PAIRS[rust_name].__name__} differ"
    assert set(rust.get("required", ())) == set(python), "every field is always written"
    for key, annotation in python.items():
        assert _python_type(annotation) == _json_type(schema, rust["properties"][key]), f"{rust_name}.{key}"


def test_every_field_a_metric_reads_exists_in_the_document(schema):
    fields = [readings for *_, readings in GATEWAY_METRICS if isinstance(readings, Field)]
    assert len(fields) > 10, "the metrics read their fields through Field, which this test can see"
    for field in fields:
        assert field.key in typing.get_type_hints(stats.OBJECT_TYPES[field.of]), f"{field.of}.{field.key}"
    for key, name, _ in CLUSTER_HISTOGRAMS:
        assert key in typing.get_type_hints(stats.ClusterStats), name


def _assert_conforms(value: object, annotation: Any, where: str) -> None:
    """``value`` is what ``annotation`` (a TypedDict, dict[str, X], list[X], int or bool) describes."""
    origin = typing.get_origin(annotation) or annotation
    if typing.is_typeddict(origin):
        assert isinstance(value, dict), where
        hints = typing.get_type_hints(origin)
        assert set(value) == set(hints), f"{where}: {sorted(set(value) ^ set(hints))}"
        for key, inner in hints.items():
            _assert_conforms(value[key], inner, f"{where}.{key}")
    elif origin is dict:
        assert isinstance(value, dict), where
        for key, item in value.items():
            _assert_conforms(item, typing.get_args(annotation)[1], f"{where}[{key!r}]")
    elif origin is list:
        assert isinstance(value, list), where
        for index, item in enumerate(value):
            _assert_conforms(item, typing.get_args(annotation)[0], f"{where}[{index}]")
    else:
        assert type(value) is origin, f"{where}: {value!r} is not {origin.__name__}"


def test_a_running_gateways_document_is_what_the_types_say(make_zone, echo_server):
    east, west = make_zone("east"), make_zone("west")
    trust_each_other(east, west)
    sni = service_sni("echo", "default", 7, east.trust_domain)
    with (
        Gateway(_ingress(east, sni, echo_server, allow=["*"])) as ingress,
        Gateway(_egress(west, east, sni, ingress.address("ingress"))) as egress,
    ):
        with socket.create_connection(egress.address("egress"), timeout=5) as sock:
            assert round_trip(sock, b"ping") == b"ping"
        for document in (ingress.stats(), egress.stats()):
            _assert_conforms(document, stats.StatsDocument, "stats")
            assert document["listeners"], "a document with objects in it, so their fields are checked too"
        assert egress.stats()["clusters"], "the egress has a cluster with an endpoint"
