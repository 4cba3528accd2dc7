"""The one definition of each default a running zone starts with.

``meshfed up``'s flags, the settings objects (:class:`meshfed.runtime.ZoneSettings`
and the parts it hands each component whole, ``ControllerSettings`` and
``PeeringSettings``) and ``zone.toml`` (:class:`meshfed.zone.ZoneConfig`) all
read their defaults from here, and ``tests/test_defaults.py`` checks that the
flags and the Helm chart's ``values.yaml`` say the same. Plain values only: this module
is imported by the CLI before anything heavy loads.

Peers in other clusters dial the peering, establishment and gateway ports, so
those listen on every interface; the API, which holds the admin token's power,
and the egress listeners, which only local clients call, stay on loopback.
"""

from __future__ import annotations

import datetime as dt
from typing import Final, Literal

API_ADDRESS: Final = "127.0.0.1:8470"
GATEWAY_ADDRESS: Final = "0.0.0.0:15443"
PEERING_ADDRESS: Final = "0.0.0.0:15440"
ESTABLISH_ADDRESS: Final = "0.0.0.0:15441"
BUNDLE_ENDPOINT_HOST: Final = "0.0.0.0"  # noqa: S104 -- consumers in other zones fetch the bundle
EGRESS_HOST: Final = "127.0.0.1"
# Imports get ports from here up, kept per import across restarts; 0 gives each an ephemeral port.
EGRESS_PORT_BASE: Final = 15500

HEARTBEAT_INTERVAL: Final = dt.timedelta(seconds=5)
# How often a zone with a state replica (--state-secret, --state-kv) publishes what changed: a change
# reaches the platform within about this long.
STATE_REPLICA_INTERVAL: Final = dt.timedelta(seconds=2)
# How often a leader with --gateway-feed looks for a newly applied gateway config to publish, and how
# often a gateway replica (meshfed gateway) reads the feed: a change reaches the replicas within about
# the sum of the two, plus the write.
GATEWAY_FEED_INTERVAL: Final = dt.timedelta(milliseconds=250)
GATEWAY_REPLICA_POLL: Final = dt.timedelta(seconds=1)
# A gateway replica's probes and Prometheus listener (meshfed gateway --metrics-address).
GATEWAY_REPLICA_METRICS_ADDRESS: Final = "127.0.0.1:15090"
# How long a gateway replica keeps serving after SIGTERM (not ready) before it closes: kube-proxy and load
# balancers take a few seconds to stop sending new connections to a pod that stops.
GATEWAY_REPLICA_DRAIN: Final = dt.timedelta(seconds=5)
# Then, with its listeners closed, how long it gives the connections still open to end: with the drain,
# within the chart's terminationGracePeriodSeconds (30).
GATEWAY_REPLICA_FINISH: Final = dt.timedelta(seconds=20)
FAILING_PEER_GRACE: Final = dt.timedelta(minutes=5)
FAILING_PEER_POLICY: Final[Literal["open", "closed"]] = "open"
HEALTH_CHECK_INTERVAL: Final = dt.timedelta(seconds=5)  # active checks of local endpoints

__all__ = [
    "API_ADDRESS",
    "BUNDLE_ENDPOINT_HOST",
    "EGRESS_HOST",
    "EGRESS_PORT_BASE",
    "ESTABLISH_ADDRESS",
    "FAILING_PEER_GRACE",
    "FAILING_PEER_POLICY",
    "GATEWAY_ADDRESS",
    "HEALTH_CHECK_INTERVAL",
    "HEARTBEAT_INTERVAL",
    "PEERING_ADDRESS",
]
