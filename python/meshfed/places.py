"""Where a list holds other objects than the last one: the first step of every per-change difference.

Across a change, a zone's snapshots, builds and configs keep the very objects of
what did not change, in their places. The interpreter's own pass
(``map(operator.is_not, ...)``, ``compress``) finds the few places that hold
other objects, without a loop of ours over 10,000 items; a pass that does not
happen beats a faster one. Callers fall back to keys when the places moved.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from typing import TypeVar

_T = TypeVar("_T")


def changed_places(
    last: Sequence[_T],
    now: Sequence[_T],
    *,
    key: Callable[[_T], object] | None = None,
    at_most: float = 1.0,
) -> list[int] | None:
    """The places where ``now`` holds other objects than ``last``; None when that cannot say the change:
    the lengths differ, an object at such a place has another ``key`` (items moved, or came and went), or
    more than the fraction ``at_most`` of the places changed (doing it all again costs no more)."""
    if len(now) != len(last):
        return None
    places = list(itertools.compress(range(len(now)), map(operator.is_not, last, now)))
    if len(places) > len(now) * at_most:
        return None
    if key is not None and any(key(last[place]) != key(now[place]) for place in places):
        return None
    return places
