"""The ``meshfed`` command line: one command group per noun.

Every failure meshfed expects prints one line on stderr and exits non-zero;
tracebacks are reserved for bugs. Usage errors are one line too, ``meshfed:
error: <message> (see 'meshfed <command> --help')``, exit 2. The exit codes
are ``ExitCode`` in ``meshfed.cli.common``.
"""

from __future__ import annotations

import errno
import importlib
import os
import sqlite3
import sys
from enum import StrEnum
from typing import Annotated, NoReturn

import typer
import typer.main
from pydantic import ValidationError
from typer import _click as click  # typer vendors click: TyperGroup's overrides take its types
from typer.core import TyperGroup

from meshfed import __version__, _core
from meshfed.cli import _signals  # noqa: F401 -- before the command groups: SIGTERM while `up` imports them
from meshfed.cli.common import ExitCode, Output, OutputOption, emit, fail
from meshfed.errors import MeshfedError
from meshfed.sqlite import describe_error
from meshfed.validation import describe_validation_error

# Command groups by name: (module under meshfed.cli, its Typer app or command function). Each is
# imported when the command line names it, so `meshfed version` does not pay for gRPC, the catalog
# clients and the zone's stores (about a second of imports) before printing one line.
_LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "zone": ("zone", "zone_app"),
    "trust": ("trust", "trust_app"),
    "service": ("service", "service_app"),
    "catalog": ("service", "catalog_app"),
    "export": ("export", "export_app"),
    "authz": ("authz", "authz_app"),
    "peer": ("peer", "peer_app"),
    "status": ("status", "status"),
    "explain": ("status", "explain"),
    "up": ("up", "up"),
    "gateway": ("gateway", "gateway"),
}


class _LazyGroup(TyperGroup):
    """The root command: the groups of ``_LAZY_COMMANDS`` are loaded on first use (click's lazy-group pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _LAZY_COMMANDS:
            return super().get_command(ctx, cmd_name)
        module_name, attribute = _LAZY_COMMANDS[cmd_name]
        module = importlib.import_module(f"meshfed.cli.{module_name}")
        target = getattr(module, attribute)
        command: click.Command
        if isinstance(target, typer.Typer):  # a group, even of one subcommand (`catalog list`)
            command = typer.main.get_group(target)
        else:  # a single command: typer turns a one-command app into that command
            single = typer.Typer()
            single.command(cmd_name)(target)
            command = typer.main.get_command(single)
        command.name = cmd_name
        return command


app = typer.Typer(
    name="meshfed",
    cls=_LazyGroup,
    help="Federate service meshes across clusters: SPIFFE trust bridging, catalogs, east-west gateways.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version_text() -> str:
    return f"meshfed {__version__} (core {_core.core_version()})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(_version_text())
        raise typer.Exit(ExitCode.OK)


@app.callback()
def _meshfed(
    _version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version (as 'meshfed version')."
        ),
    ] = False,
) -> None:
    pass


@app.command()
def version(output: OutputOption = Output.table) -> None:
    """Print meshfed's version and the Rust core's version (-o json: {"meshfed": ..., "core": ...})."""
    emit({"meshfed": __version__, "core": _core.core_version()}, output, table=lambda: typer.echo(_version_text()))


class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


@app.command()
def completion(shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.")]) -> None:
    """Print the shell completion script: eval "$(meshfed completion bash)" (or zsh; fish: | source)."""
    from typer._completion_shared import get_completion_script

    typer.echo(get_completion_script(prog_name=PROG, complete_var=_COMPLETE_VAR, shell=shell.value))


PROG = "meshfed"
_COMPLETE_VAR = "_MESHFED_COMPLETE"  # what the completion script sets when it asks meshfed for candidates


@app.command()
def demo(
    requests: Annotated[int, typer.Option(min=1, max=100_000, help="HTTP requests to send across zones.")] = 200,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="Concurrent client connections.")] = 8,
) -> None:
    """Federate three zones on this machine with tokens and send traffic through their gateways."""
    from meshfed.demo import run_demo

    report = run_demo(requests=requests, concurrency=concurrency)
    if not report.ok:
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the ``meshfed`` script: exits with an ``ExitCode``, errors in one line on stderr."""
    if _COMPLETE_VAR in os.environ:  # the shell asks for candidates: typer registers its shells only on request
        from typer._completion_classes import completion_init

        completion_init()
    try:
        code = app(prog_name=PROG, complete_var=_COMPLETE_VAR, standalone_mode=False)
    except typer.TyperException as err:  # click's UsageError (exit 2) and the rest of its errors
        if type(err).__name__ == "NoArgsIsHelpError":  # the help is printed already (typer checks it so too)
            sys.exit(ExitCode.USAGE)
        _usage_error(err)
    except typer.Abort:  # input ended at a prompt
        print(f"{PROG}: aborted", file=sys.stderr)
        sys.exit(ExitCode.INTERRUPTED)
    except MeshfedError as err:
        fail(str(err))
    except ValidationError as err:  # a model built from user input that a command did not check first
        fail(describe_validation_error(err))
    except sqlite3.Error as err:
        # Opening a database turns its errors into ZoneError; a damaged page may only show on a later query.
        fail(describe_error(err))
    except OSError as err:
        message = f"{err.strerror or err}: {err.filename}" if err.filename else str(err)
        fail(f"{message}; raise the open-file limit (ulimit -n)" if err.errno in _FD_EXHAUSTED else message)
    except KeyboardInterrupt:
        sys.exit(ExitCode.INTERRUPTED)
    # Without standalone mode typer returns what the command returned (None), or the code of a typer.Exit.
    sys.exit(code if isinstance(code, int) else ExitCode.OK)


def _usage_error(err: typer.TyperException) -> NoReturn:
    """``meshfed: error: <message> (see 'meshfed <command> --help')``, on one line."""
    # Typer words an enum's refusal as pydantic does ("Value error, 'x' is not one of ..."): drop that.
    message = " ".join(err.format_message().split()).removesuffix(".").replace(": Value error, ", ": ")
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    param, ctx = getattr(err, "param", None), getattr(err, "ctx", None)
    envvar = getattr(param, "envvar", None)
    if type(err).__name__ == "MissingParameter" and isinstance(envvar, str):
        # "missing option '--dir' (or set MESHFED_DIR)", whether or not typer named the variable.
        message = message.replace(f" (env var: '{envvar}')", "") + f" (or set {envvar})"
    command = getattr(ctx, "command_path", None) or PROG
    print(f"{PROG}: error: {message} (see '{command} --help')", file=sys.stderr)
    sys.exit(getattr(err, "exit_code", ExitCode.USAGE))


_FD_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE})


__all__ = ["app", "main"]
