"""A SIGTERM that reaches ``meshfed up`` while Python still imports it is recorded, not fatal.

``meshfed up`` stops cleanly (exit 0) on SIGTERM at any moment. Importing the
CLI takes a good part of a second, before ``serve_zone`` can install its
handler; this module is imported first by ``meshfed.cli`` and, for ``meshfed
up`` only, records the signal until ``serve_zone`` takes over and honours it.
Every other command keeps the default (SIGTERM ends it at once).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

received: list[int] = []
"""Signals that arrived before ``serve_zone`` installed its handler."""


def _record(signum: int, _frame: FrameType | None) -> None:
    received.append(signum)


if sys.argv[1:2] == ["up"] and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _record)
