"""A running gateway: a thin, typed handle on ``meshfed._core.Gateway``.

The Rust object owns its own tokio runtime; every call here releases the GIL
while Rust works, and nothing on the per-connection path runs Python.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import orjson

from meshfed import _core
from meshfed.errors import GatewayConfigError, GatewayError
from meshfed.gateway.config import GatewayConfig, GatewayPatch

_T = TypeVar("_T")


class Gateway:
    """Start a gateway with a config; :meth:`apply` new ones; :meth:`close` when done.

    A config is a :class:`GatewayConfig` or the JSON bytes of one, or one
    :func:`compile_config` compiled (started without compiling it again). A rejected
    config raises :class:`GatewayConfigError` naming the field, and the running
    config stays in force.
    """

    def __init__(self, config: GatewayConfig | bytes | Compiled) -> None:
        if isinstance(config, Compiled):
            compiled = config.take()
            self._core = _call(lambda: _core.Gateway.start_compiled(compiled))
        else:
            self._core = _call(lambda: _core.Gateway(_document(config)))

    def __enter__(self) -> Gateway:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def apply(self, config: GatewayConfig | bytes | Compiled) -> None:
        """Swap in a new config atomically; live connections finish on the old one.

        A :class:`Compiled` config (from :func:`compile_config`) is applied without compiling it
        again, and can be applied once.
        """
        if isinstance(config, Compiled):
            compiled = config.take()
            _call(lambda: self._core.apply_compiled(compiled))
        else:
            _call(lambda: self._core.apply(_document(config)))

    def apply_patch(self, patch: GatewayPatch | bytes) -> None:
        """Apply a change to the running config, compiled against it in work for the change only.

        The result is what :meth:`apply` of the full config with these edits would give (same
        checks, same carried-over counters and health); untouched listeners keep their sockets and
        connections. A refused patch raises :class:`GatewayConfigError` (or :class:`GatewayError`
        when a new listener cannot bind) and changes nothing.
        """
        document = patch if isinstance(patch, bytes) else patch.to_json()
        _call(lambda: self._core.apply_patch(document))

    def addresses(self) -> dict[str, tuple[str, int]]:
        """Bound address of each listener, by listener name."""
        return {name: _split_address(address) for name, address in self._core.addresses().items()}

    def address(self, listener: str) -> tuple[str, int]:
        """Bound address of one listener."""
        try:
            return self.addresses()[listener]
        except KeyError:
            raise GatewayError(f"gateway has no listener named {listener!r}") from None

    def stats(self) -> dict[str, Any]:
        """Counters per listener, read without disturbing the data plane."""
        stats: dict[str, Any] = orjson.loads(self._core.stats())
        return stats

    def unhealthy_endpoints(self) -> dict[str, list[str]]:
        """Endpoints (``ip:port``) the data plane sees failing, by cluster; cheap enough to poll."""
        return self._core.unhealthy_endpoints()

    def close(self) -> None:
        """Stop every listener and the data-plane runtime. Safe to call twice."""
        self._core.close()


def validate(config: GatewayConfig | bytes) -> None:
    """Compile ``config`` without starting anything; raises :class:`GatewayConfigError`."""
    _call(lambda: _core.validate_config(_document(config)))


class Compiled:
    """A config the Rust core compiled (and so checked), to apply once without compiling it again.

    Building a zone's config checks it before applying it; at 10,000 services compiling twice
    was a fifth of every apply.
    """

    def __init__(self, core: _core.CompiledConfig, config: GatewayConfig | None) -> None:
        self._core: _core.CompiledConfig | None = core
        self.config = config
        """What was compiled, when it was a :class:`GatewayConfig` (None for a document given as bytes)."""

    def take(self) -> _core.CompiledConfig:
        core, self._core = self._core, None
        if core is None:
            raise GatewayError("this compiled gateway config was applied already; build it again")
        return core


def compile_config(config: GatewayConfig | bytes) -> Compiled:
    """Compile ``config`` without starting anything (as :func:`validate`), for :meth:`Gateway.apply`."""
    return Compiled(
        _call(lambda: _core.compile_config(_document(config))), config if isinstance(config, GatewayConfig) else None
    )


def _document(config: GatewayConfig | bytes) -> bytes:
    return config if isinstance(config, bytes) else config.to_json()


def _call(action: Callable[[], _T]) -> _T:
    try:
        return action()
    except _core.ConfigError as err:
        raise GatewayConfigError(f"gateway config rejected: {err}") from None
    except _core.GatewayError as err:
        raise GatewayError(str(err)) from None


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)
