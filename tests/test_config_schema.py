"""The Python gateway models agree with the schema the Rust core derives from its own config types.

Rust parses the config document, so its serde types are the truth; ``_core.gateway_config_schema()``
is their JSON Schema (schemars). Each Rust object is paired with its pydantic model here, and a field
added, renamed or dropped on either side, a changed default, a changed required/optional or a changed
enum value fails a test. Listeners are one flat struct in Rust and a union tagged by ``mode`` in
Python, so for them the union's fields and the modes are compared instead.
"""

from __future__ import annotations

import json
import typing
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from meshfed import _core
from meshfed.gateway import config

# Rust type name -> the pydantic model or dataclass that mirrors it.
PAIRS: dict[str, type[Any]] = {
    "Document": config.GatewayConfig,
    "Identity": config.Identity,
    "Route": config.Route,
    "AuthzRule": config.AuthzRule,
    "WeightedCluster": config.WeightedCluster,
    "RateLimit": config.RateLimit,
    "Cluster": config.Cluster,
    "Endpoint": config.Endpoint,
    "OutlierDetection": config.OutlierDetection,
    "HealthCheck": config.HealthCheck,
    "CircuitBreaker": config.CircuitBreaker,
    "UpstreamTls": config.UpstreamTls,
    "ListenerLimits": config.ListenerLimits,
    "ConnectRoute": config.ConnectRoute,
    "Patch": config.GatewayPatch,
    "RoutePatch": config.RoutePatch,
    "ConnectRoutePatch": config.ConnectRoutePatch,
}
LISTENERS: tuple[type[Any], ...] = (
    config.PassthroughListener,
    config.TerminateListener,
    config.OriginateListener,
    config.ConnectListener,
)


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(_core.gateway_config_schema())
    return document


def _object(schema: dict[str, Any], name: str) -> dict[str, Any]:
    if name == schema.get("title"):
        return schema
    found: dict[str, Any] = schema["$defs"][name]
    return found


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    return _object(schema, ref.removeprefix("#/$defs/"))


def _enum_values(schema: dict[str, Any], node: dict[str, Any]) -> set[str]:
    """Every string constant a property allows, through references, ``anyOf`` and ``oneOf``."""
    node = _resolve(schema, node)
    values = {v for v in node.get("enum", []) if isinstance(v, str)}
    if isinstance(node.get("const"), str):
        values.add(node["const"])
    for branch in (*node.get("anyOf", []), *node.get("oneOf", [])):
        values |= _enum_values(schema, branch)
    return values


def _fields(model: type[Any]) -> dict[str, FieldInfo]:
    """The fields of a pydantic model or a pydantic dataclass."""
    fields: dict[str, FieldInfo] = model.model_fields if issubclass(model, BaseModel) else model.__pydantic_fields__
    return fields


def _python_default(field: FieldInfo) -> Any:
    """The default as it would appear in the JSON document (``None`` when absent means null)."""
    return to_jsonable_python(field.get_default(call_default_factory=True))


def _python_literals(field: FieldInfo) -> set[str]:
    annotation = field.annotation
    if typing.get_origin(annotation) is typing.Literal:
        return {v for v in typing.get_args(annotation) if isinstance(v, str)}
    return set()


@pytest.mark.parametrize("rust_name", sorted(PAIRS))
def test_fields_required_defaults_and_enums_agree(schema: dict[str, Any], rust_name: str) -> None:
    rust = _object(schema, rust_name)
    model = PAIRS[rust_name]
    properties: dict[str, dict[str, Any]] = rust["properties"]
    assert set(_fields(model)) == set(properties), f"{rust_name} vs {model.__name__}: field names differ"
    required = set(rust.get("required", []))
    python_required = {name for name, field in _fields(model).items() if field.is_required()}
    assert python_required == required, f"{rust_name} vs {model.__name__}: required fields differ"
    for name, field in _fields(model).items():
        if name in required:
            continue
        # An optional Rust field without a written default is an Option: absent means null.
        assert _python_default(field) == properties[name].get("default"), f"{model.__name__}.{name}: default differs"
        literals = _python_literals(field)
        if literals or _enum_values(schema, properties[name]):
            assert literals == _enum_values(schema, properties[name]), f"{model.__name__}.{name}: values differ"
    for name in required:
        literals = _python_literals(_fields(model)[name])
        if literals or _enum_values(schema, properties[name]):
            assert literals == _enum_values(schema, properties[name]), f"{model.__name__}.{name}: values differ"


def test_listener_union_matches_the_flat_rust_listener(schema: dict[str, Any]) -> None:
    rust = _object(schema, "Listener")
    properties: dict[str, dict[str, Any]] = rust["properties"]
    python_fields = {name for model in LISTENERS for name in _fields(model)}
    assert python_fields == set(properties)
    modes = {value for model in LISTENERS for value in _python_literals(_fields(model)["mode"])}
    assert modes == _enum_values(schema, properties["mode"])
    workload_tls = _python_literals(_fields(config.OriginateListener)["workload_tls"])
    assert workload_tls == _enum_values(schema, properties["workload_tls"])
    # What Rust requires, every Python variant requires or fixes by its tag.
    for model in LISTENERS:
        fixed = {name for name, field in _fields(model).items() if field.is_required() or name == "mode"}
        assert set(rust.get("required", [])) <= fixed, model.__name__


def test_every_rust_object_has_a_python_model(schema: dict[str, Any]) -> None:
    objects = {name for name, node in schema["$defs"].items() if "properties" in node}
    assert objects == (set(PAIRS) | {"Listener"}) - {"Document"}
    assert schema["title"] == "Document"
