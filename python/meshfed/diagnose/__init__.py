"""What ``meshfed status`` and ``meshfed explain`` say about a running zone.

Both read the live zone (its controller and peering service) so they tell the
truth of the process, not of its files. The API serves them (``GET
/v1/status``, ``GET /v1/explain/{namespace}/{service}``); the CLI asks the API.
:mod:`~meshfed.diagnose.status` is the zone at a glance,
:mod:`~meshfed.diagnose.explain` one service's path, link by link.
"""

from meshfed.diagnose.explain import Explanation, Step, explain
from meshfed.diagnose.status import ZoneStatus, zone_status

__all__ = ["Explanation", "Step", "ZoneStatus", "explain", "zone_status"]
