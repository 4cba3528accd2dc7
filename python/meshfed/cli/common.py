"""Helpers shared by the command groups."""

from __future__ import annotations

import datetime as dt
import re
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

ZoneDir = Annotated[Path, typer.Option("--dir", help="The zone directory (made by 'meshfed zone init').")]


def fail(message: str) -> NoReturn:
    """Print one error line and exit 1."""
    print(f"meshfed: error: {message}", file=sys.stderr)
    sys.exit(1)


def parse_duration(text: str, option: str = "--ttl") -> dt.timedelta:
    """Parse ``90s``, ``15m``, ``1h``, ``2d`` or a combination like ``1h30m``."""
    parts = _DURATION.findall(text)
    if not text or "".join(number + unit for number, unit in parts) != text:
        raise typer.BadParameter(f"{text!r} is not a duration; use forms like 90s, 15m, 1h, 2d", param_hint=option)
    return dt.timedelta(seconds=sum(int(number) * _UNITS[unit] for number, unit in parts))
