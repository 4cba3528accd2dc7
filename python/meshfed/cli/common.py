"""Helpers shared by the command groups: exit codes, options, durations, tables, ``-o`` output.

Exit codes of every ``meshfed`` command (README, "Exit codes"):

- 0 ``OK``: done; ``meshfed up`` also after a clean stop on SIGTERM.
- 1 ``ERROR``: an error meshfed expected, said in one line on stderr.
- 2 ``USAGE``: a usage error (unknown command or option, missing or bad value), one line on stderr.
- 3 ``NEEDS_ATTENTION``: ``meshfed status`` found a problem, or ``meshfed explain`` a broken link.
- 130 ``INTERRUPTED``: Ctrl-C (SIGINT), or input ended at a prompt.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Annotated, NoReturn, TextIO

import orjson
import typer
from pydantic import BaseModel

from meshfed.errors import MeshfedError


class ExitCode(IntEnum):
    """What a ``meshfed`` process's exit status means; the one definition every command uses."""

    OK = 0
    ERROR = 1
    USAGE = 2
    NEEDS_ATTENTION = 3
    INTERRUPTED = 130


NEEDS_ATTENTION = ExitCode.NEEDS_ATTENTION

_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

DIR_ENVVAR = "MESHFED_DIR"


def _zone_directory(value: Path | None) -> Path | None:
    # A file is refused here, in one line naming the flag, before anything tries to read a zone.toml in it.
    if value is not None and value.exists() and not value.is_dir():
        raise MeshfedError(f"--dir {value}: a file, not a zone directory (make one with 'meshfed zone init')")
    return value


ZoneDir = Annotated[
    Path,
    typer.Option(
        "--dir",
        envvar=DIR_ENVVAR,
        show_envvar=True,
        callback=_zone_directory,
        help="The zone directory (made by 'meshfed zone init').",
    ),
]
OptionalZoneDir = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        envvar=DIR_ENVVAR,
        show_envvar=True,
        callback=_zone_directory,
        help="The zone directory (made by 'meshfed zone init'); not needed with --api.",
    ),
]


class Output(StrEnum):
    """``-o`` of every list and show command: a table (or lines) for people, or JSON or YAML for programs.

    JSON and YAML hold the same document: for a command whose thing has an API
    model, the objects the API returns for it (the command's help names the
    ``GET /v1/...`` it matches), with fields in the order the model defines.
    """

    table = "table"
    json = "json"
    yaml = "yaml"


OutputOption = Annotated[
    Output,
    typer.Option("--output", "-o", help="table (lines on a terminal, tab-separated when piped), json or yaml."),
]


def emit(value: object, output: Output, *, table: Callable[[], None]) -> None:
    """Print ``value`` as ``output`` says: ``table()`` for people, else one JSON line or a YAML document.

    ``value`` is anything orjson serializes (dicts, lists, dataclasses,
    datetimes, enums) or pydantic models (dumped as their JSON mode would),
    nested freely; keys keep the order the models and dicts give them.
    """
    if output is Output.table:
        table()
        return
    encoded = orjson.dumps(value, default=_model_data)
    if output is Output.json:
        sys.stdout.buffer.write(encoded + b"\n")
        sys.stdout.flush()
        return
    import yaml  # only for -o yaml

    # Through JSON, so YAML holds exactly the JSON document (strings for datetimes, values for enums).
    typer.echo(yaml.safe_dump(orjson.loads(encoded), sort_keys=False, allow_unicode=True), nl=False)


def _model_data(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot print a {type(value).__name__} as JSON")


def fail(message: str) -> NoReturn:
    """Print one error line and exit 1."""
    print(f"meshfed: error: {message}", file=sys.stderr)
    sys.exit(ExitCode.ERROR)


def parse_duration(text: str, option: str = "--ttl") -> dt.timedelta:
    """Parse ``90s``, ``15m``, ``1h``, ``2d`` or a combination like ``1h30m``."""
    parts = _DURATION.findall(text)
    if not text or "".join(number + unit for number, unit in parts) != text:
        raise typer.BadParameter(f"{text!r} is not a duration; use forms like 90s, 15m, 1h, 2d", param_hint=option)
    return dt.timedelta(seconds=sum(int(number) * _UNITS[unit] for number, unit in parts))


def duration_text(duration: dt.timedelta) -> str:
    """``duration`` as :func:`parse_duration` reads it back: ``5m``, ``1h30m``, ``0s``."""
    seconds, text = int(duration.total_seconds()), ""
    for unit, size in sorted(_UNITS.items(), key=lambda item: -item[1]):
        if seconds >= size:
            text += f"{seconds // size}{unit}"
            seconds %= size
    return text or "0s"


def print_table(
    title: str,
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    width: int = 160,
    file: TextIO | None = None,
) -> None:
    """A table on a terminal; when ``file`` (default stdout) is not one, plain tab-separated lines.

    The plain form is a header line, then one line per row, with no title and
    no box drawing, for ``cut -f``, ``awk -F'\\t'`` and ``grep``. Cells are
    plain text (no rich markup); tabs and newlines inside a cell become spaces.
    """
    out = sys.stdout if file is None else file
    cells = [[_plain(cell) for cell in row] for row in rows]
    if not out.isatty():
        for line in (list(headers), *cells):
            print("\t".join(line), file=out)
        return
    from rich.console import Console  # only for a terminal
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title)
    for header in headers:
        table.add_column(header)
    for row in cells:
        table.add_row(*(Text(cell) for cell in row))
    Console(file=out, width=width).print(table)


def _plain(cell: object) -> str:
    text = "" if cell is None else str(cell)
    return text.replace("\t", " ").replace("\r\n", " ").replace("\n", " ")
