"""Which of a zone's controller processes leads: a Kubernetes Lease or a Consul lock; see :mod:`.campaign`."""

from meshfed.leadership.campaign import Campaign, LeadershipLostError
from meshfed.leadership.consul import ConsulLockElector, LockSettings
from meshfed.leadership.lease import LeaseElector, LeaseSettings

__all__ = ["Campaign", "ConsulLockElector", "LeadershipLostError", "LeaseElector", "LeaseSettings", "LockSettings"]
