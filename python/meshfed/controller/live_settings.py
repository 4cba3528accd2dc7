"""Live settings: ``zone.toml`` read again when it changes, its live tables applied to the running zone.

``[failover]``, ``[[split]]`` and ``[[authz]]`` apply live, each change logged;
an edit that does not parse or validate is logged with its error and the
running settings stay. The rest (name, trust domain, addresses, catalog,
egress) applies at the next start, and a change to it is logged as such.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tomllib
from collections.abc import Awaitable, Callable

from pydantic import BaseModel, ValidationError

from meshfed.database import Database
from meshfed.errors import MeshfedError
from meshfed.federation.authz import AuthzRules
from meshfed.validation import describe_validation_error
from meshfed.zone import CONFIG_FILE, Zone, ZoneConfig

from .retry import retrying

# The controller's parts log as the controller: operators (and tests) follow one logger.
log = logging.getLogger("meshfed.controller")

# The tables of zone.toml a running zone applies when the file changes; the rest waits for a restart.
LIVE_SETTINGS = ("failover", "split", "authz")


class LiveSettings:
    """The settings in force: ``zone.toml`` as read at start, with live edits of its live tables applied.

    ``exports_changed`` applies them (a new gateway config, peers told); if it
    fails, the previous settings are put back and applied again.
    """

    def __init__(self, zone: Zone, state: Database, *, exports_changed: Callable[[], Awaitable[None]]) -> None:
        self._zone = zone
        self._state = state
        self._exports_changed = exports_changed
        self._settings: ZoneConfig = zone.config
        # SHA-256 of zone.toml as last read; None: compare the file with the settings at the next check.
        self._digest: bytes | None = None

    @property
    def settings(self) -> ZoneConfig:
        return self._settings

    async def load_config_rules(self) -> None:
        """Make the stored ``zone.toml`` authorization rules those of the file as it is now."""
        rules = self._settings.authz
        await self._state.using(AuthzRules, lambda authz: authz.replace_config_rules(rules))

    async def check(self) -> bool:
        """Apply ``zone.toml``'s live tables if the file changed since it was last read. True if applied.

        Called by the catalog watch five times a second: the file is a few hundred
        bytes, so it is read and hashed whole (an mtime misses two edits within
        one clock tick). An edit that does not parse or validate is logged once
        and the running settings stay; so do settings that only apply at start.
        """
        path = self._zone.directory / CONFIG_FILE
        try:
            text = await asyncio.to_thread(path.read_bytes)
        except OSError as err:
            if self._digest is not None:
                log.error("zone %s: cannot read %s, the running settings stay: %s", self._zone.name, path, err)
            self._digest = None
            return False
        digest = hashlib.sha256(text).digest()
        if digest == self._digest:
            return False
        self._digest = digest
        try:
            edited = ZoneConfig.model_validate(tomllib.loads(text.decode()))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            log.error("zone %s: %s does not parse, the running settings stay: %s", self._zone.name, path, err)
            return False
        except ValidationError as err:
            log.error(
                "zone %s: %s is invalid, the running settings stay: %s",
                self._zone.name,
                path,
                describe_validation_error(err),
            )
            return False
        return await self._apply(edited)

    async def _apply(self, edited: ZoneConfig) -> bool:
        current = self._settings
        fixed = [name for name in type(current).model_fields if name not in LIVE_SETTINGS]
        waiting = [name for name in fixed if getattr(edited, name) != getattr(current, name)]
        if waiting:
            log.warning(
                "zone %s: %s in %s changed; a running zone does not apply %s: restart the zone ('meshfed up')",
                self._zone.name,
                ", ".join(waiting),
                CONFIG_FILE,
                "that" if len(waiting) == 1 else "those",
            )
        changed = [name for name in LIVE_SETTINGS if getattr(edited, name) != getattr(current, name)]
        if not changed:
            return False
        self._settings = current.model_copy(update={name: getattr(edited, name) for name in changed})
        try:
            if "authz" in changed:
                await self.load_config_rules()
            await self._exports_changed()
        except MeshfedError as err:
            self._settings = current
            if "authz" in changed:
                await self.load_config_rules()
            log.error(
                "zone %s: the edited %s of %s cannot be applied, the running settings stay: %s",
                self._zone.name,
                " and ".join(f"[{name}]" for name in changed),
                CONFIG_FILE,
                err,
            )
            await retrying(self._zone.name, "restoring the running settings", self._exports_changed)
            return False
        for name in changed:
            log.info(
                "zone %s: [%s] of %s applied: %s (was %s)",
                self._zone.name,
                name,
                CONFIG_FILE,
                _describe_setting(getattr(edited, name)),
                _describe_setting(getattr(current, name)),
            )
        return True


def _describe_setting(value: object) -> str:
    """A live setting in one line for the log: tables as JSON."""
    if isinstance(value, list):
        return "[" + ", ".join(_describe_setting(item) for item in value) + "]"
    if isinstance(value, BaseModel):
        return value.model_dump_json(exclude_defaults=True)
    return repr(value)
