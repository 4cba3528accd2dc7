"""The one owner of a zone's long-running background work.

Every loop a running zone keeps (catalog watch, SVID renewal, peering poll,
heartbeat watch, dialers, rotation, bundle polling, import publication) runs
as a named component here instead of a free ``asyncio.Task``. A component
that ends with an exception — or is cancelled by anything but
:meth:`Supervisor.stop` / :meth:`Component.cancel` — is logged as an error
with its traceback, shown by :meth:`Supervisor.problems` (and so by
``/readyz``), and restarted with exponential backoff. Nothing dies silently.

A component that returns normally has finished its job and is not restarted.

Readiness is per component: running is not the same as doing its job. A
component may be given a probe (``spawn(..., ready=...)``) that says, in one
line, why it is not doing its job now (the catalog does not answer, a bundle
endpoint fails) or None when it is; :meth:`Supervisor.statuses` evaluates it,
and the reason is one of :meth:`Supervisor.problems` as a crash is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

# Restart delays: doubled after each crash up to the cap; reset once a run lasted RESET_AFTER.
RESTART_BACKOFF = (0.5, 30.0)
RESET_AFTER = 60.0
# How long stopping a component may take; it is cancelled again every _RECANCEL_EVERY seconds meanwhile.
STOP_TIMEOUT = 10.0
_RECANCEL_EVERY = 0.1

Run = Callable[[], Coroutine[Any, Any, None]]
# Why a running component is not doing its job now, in one line; None when it is.
Readiness = Callable[[], str | None]
ComponentState = Literal["running", "restarting", "finished", "stopped"]


@dataclass
class ComponentStatus:
    """How one component is doing; ``problem`` is set while it waits to restart."""

    name: str
    state: ComponentState = "running"
    restarts: int = 0
    last_error: str = ""
    problem: str = ""
    ready: bool = True  # running and, if it has a probe, doing its job (see the module docstring)


@dataclass
class Component:
    """A supervised loop: its current task, and how to stop it for good."""

    supervisor: Supervisor
    status: ComponentStatus
    run: Run
    probe: Readiness | None = None
    task: asyncio.Task[None] | None = None
    _delay: float = 0.0
    _started_at: float = 0.0
    _restart: asyncio.TimerHandle | None = field(default=None, repr=False)
    _stopping: bool = False

    @property
    def name(self) -> str:
        return self.status.name

    async def cancel(self) -> None:
        """Stop this component for good and wait until its task has finished."""
        self._stopping = True
        self.status.state, self.status.problem = "stopped", ""
        if self._restart is not None:
            self._restart.cancel()
        task = self.task
        if task is not None and task is not asyncio.current_task():
            await _cancelled(task, self.supervisor, self.name)
        self.supervisor._forget(self)

    def refresh_readiness(self) -> None:
        """Probe whether a running component does its job; a crashed one says so already."""
        if self.status.state != "running":
            self.status.ready = False
            return
        try:
            reason = self.probe() if self.probe is not None else None
        except Exception as err:  # a broken probe is a problem to show, never one to raise into /readyz
            reason = f"its readiness probe failed ({type(err).__name__}: {err})"
        self.status.ready = reason is None
        self.status.problem = "" if reason is None else f"{self.name} is not ready: {reason}"

    def _start(self) -> None:
        self._restart = None
        self._started_at = time.monotonic()
        self.status.state, self.status.problem = "running", ""
        self.task = asyncio.create_task(self.run(), name=f"meshfed-{self.supervisor.zone}-{self.name}")
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping:
            return
        if task.cancelled():
            error = "cancelled by something other than the zone's shutdown"
        elif (exc := task.exception()) is None:
            self.status.state = "finished"
            self.supervisor._forget(self)
            return
        else:
            error = f"{type(exc).__name__}: {exc}"
            log.error(
                "zone %s: background component %s crashed",
                self.supervisor.zone,
                self.name,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
        first, cap = self.supervisor.backoff
        if not self._delay or time.monotonic() - self._started_at >= RESET_AFTER:
            self._delay = first
        delay, self._delay = self._delay, min(self._delay * 2, cap)
        self.status.state, self.status.last_error = "restarting", error
        self.status.restarts += 1
        self.status.problem = f"{self.name} crashed ({error}); restarting in {delay:.1f}s"
        log.error("zone %s: %s", self.supervisor.zone, self.status.problem)
        self._restart = asyncio.get_running_loop().call_later(delay, self._start)


async def _cancelled(task: asyncio.Task[None], supervisor: Supervisor, name: str) -> None:
    """Cancel ``task`` and wait for it to end, cancelling again while it swallows the cancel (Python 3.11's
    ``wait_for`` can); after the stop timeout it is left behind with an error, so a shutdown never hangs."""
    loop = asyncio.get_running_loop()
    zone, timeout = supervisor.zone, supervisor.stop_timeout
    deadline = loop.time() + timeout
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=min(_RECANCEL_EVERY, max(deadline - loop.time(), 0.0)))
        if not task.done() and loop.time() >= deadline:
            log.error("zone %s: component %s did not stop within %gs; leaving it behind", zone, name, timeout)
            return
    if not task.cancelled() and task.exception() is not None:
        log.debug("zone %s: component %s ended with %r while stopping", zone, name, task.exception())


class Supervisor:
    """Starts, restarts and stops a zone's background components (see the module docstring)."""

    def __init__(
        self, zone: str, *, backoff: tuple[float, float] = RESTART_BACKOFF, stop_timeout: float = STOP_TIMEOUT
    ) -> None:
        self.zone = zone
        self.backoff = backoff
        self.stop_timeout = stop_timeout
        self._components: dict[str, Component] = {}
        self._stopped = False

    def spawn(self, name: str, run: Run, *, ready: Readiness | None = None) -> Component:
        """Run ``run()`` as component ``name`` (unique among running ones), restarting it if it crashes.

        ``ready`` says why the component is not doing its job now (None: it is); without it, a running
        component is ready.
        """
        if self._stopped:
            raise RuntimeError(f"zone {self.zone}: the supervisor is stopped; {name} cannot start")
        if name in self._components:
            raise RuntimeError(f"zone {self.zone}: a component named {name} already runs")
        component = Component(self, ComponentStatus(name), run, ready)
        self._components[name] = component
        component._start()
        return component

    def statuses(self) -> list[ComponentStatus]:
        """Every component's status now, its readiness probed."""
        for component in self._components.values():
            component.refresh_readiness()
        return [component.status for component in self._components.values()]

    def problems(self) -> list[str]:
        """One line per component that crashed and waits to restart, or runs without doing its job."""
        return [status.problem for status in self.statuses() if status.problem]

    async def stop(self) -> None:
        """Stop every component (newest first) and wait for each. Safe to call twice."""
        self._stopped = True
        for component in reversed(list(self._components.values())):
            await component.cancel()

    def _forget(self, component: Component) -> None:
        if self._components.get(component.name) is component:
            del self._components[component.name]


__all__ = ["Component", "ComponentStatus", "Readiness", "Supervisor"]
