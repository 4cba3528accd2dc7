"""The leader's pod, labelled: Services select the pod that serves, and every pod of the zone can be Ready.

A follower serves nothing, yet a Deployment whose pods are not all Ready never
becomes Available (``helm install --wait`` and ``kubectl rollout status`` wait
forever). With ``meshfed up --leader-pod NAMESPACE/NAME`` a process labels its
own pod ``meshfed.io/leader=false`` before it campaigns and ``true`` once it
leads and its zone is ready, and ``false`` again when it stops leading; the
chart's Services select ``meshfed.io/leader=true``, and a follower's
``/readyz`` answers 200 ``following``. A leader that dies without relabelling
its pod is either gone with it or restarted in it, and a restarted process
relabels it ``false`` before anything else. The identity needs ``patch`` on
pods of the namespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshfed.errors import MeshfedError

if TYPE_CHECKING:
    from meshfed.catalog.kubernetes_api import KubernetesApi

LEADER_LABEL = "meshfed.io/leader"


@dataclass(frozen=True)
class LeaderPod:
    """``--leader-pod``: the pod this process runs in."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"pod {self.namespace}/{self.name}"


class PodLabel:
    """Labels ``pod`` as leading or not, through ``api``."""

    def __init__(self, api: KubernetesApi, pod: LeaderPod) -> None:
        self._api, self.pod = api, pod

    async def mark(self, leading: bool) -> None:
        """Label the pod; a failure is one line naming the pod and what to check."""
        from meshfed.catalog.kubernetes_api import NotFoundError

        labels = {LEADER_LABEL: "true" if leading else "false"}
        try:
            await self._api.request(self._api.label_call(self.pod.namespace, self.pod.name, labels))
        except NotFoundError as err:
            raise MeshfedError(
                f"--leader-pod: no {self.pod} ({err.message}); give the pod this process runs in "
                "(NAMESPACE/$(POD_NAME) from the downward API)"
            ) from None
        except MeshfedError:
            raise
        except Exception as err:
            raise MeshfedError(f"--leader-pod: cannot label {self.pod}: {self._api.describe(err)}") from None


__all__ = ["LEADER_LABEL", "LeaderPod", "PodLabel"]
