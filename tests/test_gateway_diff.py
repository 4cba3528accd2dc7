"""The patch between two configs turns the first into the second, and holds only what changed.

The driver sends the data plane ``config_patch(running, next)`` instead of the
next whole config (the core's own tests show a patch gives what the edited whole
document gives). Here: the patch, applied to the running config by the patch
rules, is the next config; it names nothing that did not change; and what it
cannot say (a new identity or new bundles) asks for a whole config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from meshfed.federation.gateway_config import Fragments
from meshfed.gateway import GatewayConfig, GatewayPatch, Identity
from meshfed.gateway.config import ConnectListener, PassthroughListener, TerminateListener
from meshfed.gateway.diff import config_patch, is_empty
from tests.test_gateway_config_fragments import CHANGES, build


def patched(config: GatewayConfig, patch: GatewayPatch) -> dict[str, Any]:
    """``patch`` applied to ``config`` by the patch rules, in a form that ignores order."""
    clusters = {cluster.name: cluster for cluster in config.clusters}
    clusters.update({cluster.name: cluster for cluster in patch.clusters})
    for name in patch.remove_clusters:
        del clusters[name]
    listeners: dict[str, Any] = {listener.name: listener for listener in config.listeners}
    listeners.update({listener.name: listener for listener in patch.listeners})
    for name in patch.remove_listeners:
        del listeners[name]
    for edit in patch.routes:
        routes = {route.sni: route for route in listeners[edit.listener].routes}
        routes.update({route.sni: route for route in edit.upsert})
        for sni in edit.remove:
            del routes[sni]
        listeners[edit.listener] = dataclasses.replace(listeners[edit.listener], routes=list(routes.values()))
    for connect in patch.connect_routes:
        named = {route.authority: route for route in listeners[connect.listener].connect_routes}
        named.update({route.authority: route for route in connect.upsert})
        for authority in connect.remove:
            del named[authority]
        listeners[connect.listener] = dataclasses.replace(
            listeners[connect.listener], connect_routes=list(named.values())
        )
    return canonical(GatewayConfig(listeners=list(listeners.values()), clusters=list(clusters.values())))


def canonical(config: GatewayConfig) -> dict[str, Any]:
    def listener(item: Any) -> Any:
        if isinstance(item, (PassthroughListener, TerminateListener)):
            return dataclasses.replace(item, routes=sorted(item.routes, key=lambda route: route.sni))
        if isinstance(item, ConnectListener):
            return dataclasses.replace(item, connect_routes=sorted(item.connect_routes, key=lambda r: r.authority))
        return item

    return {
        "listeners": sorted((listener(item) for item in config.listeners), key=lambda item: item.name),
        "clusters": sorted(config.clusters, key=lambda item: item.name),
    }


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("warm", [True, False], ids=["reused pieces", "built afresh"])
def test_the_patch_turns_the_running_config_into_the_next(change: str, warm: bool) -> None:
    fragments = Fragments()
    running = build(fragments)
    new = build(fragments if warm else None, **CHANGES[change]())
    patch = config_patch(running, new)
    assert patch is not None
    assert not is_empty(patch)
    assert patched(running, patch) == canonical(new)
    back = config_patch(new, running)
    assert back is not None
    assert patched(new, back) == canonical(running)


def test_one_endpoint_is_one_cluster() -> None:
    fragments = Fragments()
    running = build(fragments)
    patch = config_patch(running, build(fragments, **CHANGES["an endpoint added"]()))
    assert patch is not None
    assert [cluster.name for cluster in patch.clusters] == ["local:default/web"]
    assert (patch.remove_clusters, patch.listeners, patch.remove_listeners) == ([], [], [])
    assert (patch.routes, patch.connect_routes) == ([], [])


def test_an_import_gone_is_removed_by_name_from_the_connect_listener() -> None:
    fragments = Fragments()
    running = build(fragments)
    patch = config_patch(running, build(fragments, **CHANGES["an import gone"]()))
    assert patch is not None
    # cart from west is gone, and with it the failover group of cart (west and north, now north alone).
    assert sorted(patch.remove_clusters) == ["egress:cart.default.west:tcp", "failover:cart.default:tcp"]
    (edit,) = patch.connect_routes
    assert (edit.upsert, sorted(edit.remove)) == ([], ["cart.default.west:7", "cart.default:7"])
    assert patch.clusters == []


def test_nothing_changed_is_an_empty_patch() -> None:
    fragments = Fragments()
    assert is_empty(config_patch(build(fragments), build(fragments)) or GatewayPatch(clusters=[]))
    assert is_empty(config_patch(build(None), build(None)) or GatewayPatch())


def test_a_new_identity_or_new_bundles_need_a_whole_config() -> None:
    running = build(None)
    renewed = running.model_copy(update={"identity": Identity(cert_chain_pem="renewed", private_key_pem="key")})
    assert config_patch(running, renewed) is None
    rebundled = running.model_copy(update={"trust_bundles": {"west.mesh": "roots"}})
    assert config_patch(running, rebundled) is None
