"""What changed between two gateway configs, as the patch that turns the running one into the next.

The control plane builds a whole config on every change (cheaply: unchanged
services and imports are the previous build's very objects, see
``federation/gateway_config.py``), and sends the data plane only the
difference: a cluster, listener or route that is the same object, or equal,
is left out. At 10,000 services one endpoint changed is a patch of one
cluster, which the core compiles alone, instead of a 10,000-cluster document.

A listener whose only change is its routes (the ingress, a CONNECT listener)
is patched route by route; any other change to it replaces it whole. The
identity, the trust bundles and the handshake timeout are not patchable:
:func:`config_patch` says a whole config is needed then.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TypeVar

from meshfed.gateway.config import (
    ConnectListener,
    ConnectRoute,
    ConnectRoutePatch,
    GatewayConfig,
    GatewayPatch,
    Listener,
    PassthroughListener,
    Route,
    RoutePatch,
    TerminateListener,
)
from meshfed.places import changed_places

_T = TypeVar("_T")


def config_patch(running: GatewayConfig, new: GatewayConfig) -> GatewayPatch | None:
    """The patch from ``running`` to ``new``; None when only a whole config can say it (see above).

    An empty patch means nothing changed.
    """
    if (
        running.identity != new.identity
        or running.trust_bundles != new.trust_bundles
        or running.handshake_timeout_ms != new.handshake_timeout_ms
    ):
        return None
    clusters, remove_clusters = _changed(running.clusters, new.clusters, lambda cluster: cluster.name)
    old_listeners = {listener.name: listener for listener in running.listeners}
    listeners: list[Listener] = []
    routes: list[RoutePatch] = []
    connect_routes: list[ConnectRoutePatch] = []
    for listener in new.listeners:
        old = old_listeners.get(listener.name)
        if old is listener:
            continue
        if isinstance(old, (PassthroughListener, TerminateListener)) and type(old) is type(listener):
            assert isinstance(listener, (PassthroughListener, TerminateListener))
            if _without(old, routes=[]) == _without(listener, routes=[]):
                upsert, remove = _changed(old.routes, listener.routes, _sni)
                if upsert or remove:
                    routes.append(RoutePatch(listener=listener.name, upsert=upsert, remove=remove))
                continue
        if (
            isinstance(old, ConnectListener)
            and isinstance(listener, ConnectListener)
            and _without(old, connect_routes=[]) == _without(listener, connect_routes=[])
        ):
            upsert_connect, remove = _changed(old.connect_routes, listener.connect_routes, _authority)
            if upsert_connect or remove:
                connect_routes.append(ConnectRoutePatch(listener=listener.name, upsert=upsert_connect, remove=remove))
            continue
        if old is None or old != listener:
            listeners.append(listener)
    kept = {listener.name for listener in new.listeners}
    return GatewayPatch(
        clusters=clusters,
        remove_clusters=remove_clusters,
        listeners=listeners,
        remove_listeners=[name for name in old_listeners if name not in kept],
        routes=routes,
        connect_routes=connect_routes,
    )


def is_empty(patch: GatewayPatch) -> bool:
    """True if the patch changes nothing."""
    return not (
        patch.clusters
        or patch.remove_clusters
        or patch.listeners
        or patch.remove_listeners
        or patch.routes
        or patch.connect_routes
    )


def _changed(old: Sequence[_T], new: Sequence[_T], key: Callable[[_T], str]) -> tuple[list[_T], list[str]]:
    """The items of ``new`` that are not in ``old`` as they are (identity first, then equality), and the
    keys of ``old`` that ``new`` no longer has."""
    aligned = _changed_in_place(old, new, key)
    if aligned is not None:
        return aligned, []
    before = {key(item): item for item in old}
    upsert = []
    seen = set()
    for item in new:
        name = key(item)
        seen.add(name)
        previous = before.get(name)
        if previous is not item and previous != item:
            upsert.append(item)
    return upsert, [name for name in before if name not in seen]


def _changed_in_place(old: Sequence[_T], new: Sequence[_T], key: Callable[[_T], str]) -> list[_T] | None:
    """The items of ``new`` that differ from ``old`` when both hold the same keys at the same places (a
    build reuses the very objects of what did not change, in the same order); None when they do not.

    At 10,000 items, one changed, a pass of ours over the unchanged ones was most of a patch's cost
    (:mod:`meshfed.places`).
    """
    places = changed_places(old, new, key=key)
    if places is None:
        return None
    return [new[place] for place in places if old[place] != new[place]]


def _without(listener: _T, **emptied: object) -> _T:
    return dataclasses.replace(listener, **emptied)  # type: ignore[type-var]


def _sni(route: Route) -> str:
    return route.sni


def _authority(route: ConnectRoute) -> str:
    return route.authority
