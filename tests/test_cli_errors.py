"""The CLI's promises to operators: one-line errors, documented exit codes, no traceback for any input.

Real subprocesses, as a user or a script runs ``meshfed``.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meshfed.cli.common import ExitCode, print_table
from tests.test_zone_process import ephemeral_flags, init_zone, meshfed_cli, one_line_error

_USAGE_LINE = re.compile(r"^meshfed: error: \S.* \(see 'meshfed( [a-z-]+)* --help'\)$")


def one_usage_error(result: subprocess.CompletedProcess[str], command: str, *fragments: str) -> str:
    assert result.returncode == ExitCode.USAGE, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert _USAGE_LINE.match(lines[0]), lines[0]
    assert lines[0].endswith(f"(see '{command} --help')"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def zone(tmp_path: Path) -> Path:
    return init_zone(tmp_path / "east")


def test_an_unknown_command_is_one_line(zone):
    one_usage_error(meshfed_cli("launch"), "meshfed", "no such command 'launch'")
    one_usage_error(meshfed_cli("trust", "lst", "--dir", zone), "meshfed trust", "no such command 'lst'")


def test_an_unknown_option_is_one_line(zone):
    one_usage_error(meshfed_cli("trust", "list", "--dir", zone, "--bogus"), "meshfed trust list", "--bogus")


def test_a_missing_dir_names_the_option_and_meshfed_dir():
    env = {key: value for key, value in os.environ.items() if key != "MESHFED_DIR"}
    result = subprocess.run(
        [sys.executable, "-m", "meshfed", "trust", "list"], capture_output=True, text=True, env=env, check=False
    )
    one_usage_error(result, "meshfed trust list", "missing option '--dir' (or set MESHFED_DIR)")


@pytest.mark.parametrize(
    ("flag", "value", "choices"),
    [("--log-level", "loud", "'debug', 'info', 'warning', 'error'"), ("--log-format", "xml", "'json', 'text'")],
)
def test_log_options_are_refused_at_parse(zone, flag, value, choices):
    result = meshfed_cli("up", "--dir", zone, flag, value, *ephemeral_flags())
    line = one_usage_error(result, "meshfed up", f"'{value}' is not one of {choices}", flag)
    assert "Value error" not in line
    assert not (zone / "api-url").exists()


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (("--state-secret", "default/east", "--state-kv", "meshfed/east"), ("--state-kv", "not both")),
        (("--state-secret", "east"), ("--state-secret", "give NAMESPACE/NAME")),
        (("--state-secret", "default/East_State"), ("--state-secret", "1-63 lower-case letters")),
        (("--state-secret", f"default/{'x' * 64}"), ("--state-secret", "1-63 lower-case letters")),
        (("--state-kv", "/meshfed/east"), ("--state-kv",)),
        (("--state-kv", "meshfed/../east"), ("--state-kv", "not empty, '.' or '..'")),
        (("--leader-lock", "meshfed//leader"), ("--leader-lock", "not empty, '.' or '..'")),
        (("--leader-pod", "default/east-0"), ("--leader-pod", "give --leader-lease or --leader-lock too")),
        (("--leader-lease", "default/east", "--leader-pod", "east-0"), ("--leader-pod", "NAMESPACE/NAME")),
        (("--gateway-feed",), ("--gateway-feed", "give --state-secret or --state-kv too")),
    ],
)
def test_a_bad_state_replica_or_lock_is_refused_at_parse(zone, flags, fragments):
    """Refused before the zone starts or any platform is called: nothing written, nothing listening."""
    result = meshfed_cli("up", "--dir", zone, *flags, *ephemeral_flags())
    one_usage_error(result, "meshfed up", *fragments)
    assert not (zone / "api-url").exists()
    assert not (zone / ".replica.json").exists()


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        ((), ("give --state-secret or --state-kv",)),
        (("--state-secret", "default/east", "--state-kv", "meshfed/east"), ("--state-kv", "not both")),
        (("--state-secret", "east"), ("--state-secret", "give NAMESPACE/NAME")),
        (("--state-kv", "meshfed/../east"), ("--state-kv", "not empty, '.' or '..'")),
        (("--state-secret", "default/east", "--consul-token-file", "t"), ("--consul-token-file", "only with")),
        (("--state-kv", "meshfed/east", "--consul-address", "ftp://consul"), ("--consul-address",)),
        (("--state-secret", "default/east", "--drain-time", "soon"), ("--drain-time", "not a duration")),
    ],
)
def test_a_gateway_replica_with_bad_flags_is_refused_at_parse(flags, fragments):
    """Refused before any platform is called or anything listens."""
    one_usage_error(meshfed_cli("gateway", *flags), "meshfed gateway", *fragments)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--listen-host", "not a host!"), ("--listen-host", "gateway.example"), ("--metrics-address", "127.0.0.1:99999")],
)
def test_a_gateway_replica_with_a_bad_address_is_one_line(flag, value):
    one_line_error(meshfed_cli("gateway", "--state-secret", "default/east", flag, value), flag)


def test_a_gateway_replica_whose_metrics_port_is_taken_is_one_line_exit_1():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = meshfed_cli("gateway", "--state-kv", "meshfed/east", "--metrics-address", f"127.0.0.1:{port}")
    one_line_error(result, "--metrics-address")


def test_a_token_file_that_is_not_one_is_refused_and_the_zones_token_kept(zone, tmp_path):
    token = (zone / "admin-token").read_bytes()
    result = meshfed_cli("up", "--dir", zone, "--admin-token-file", tmp_path / "none", *ephemeral_flags())
    one_usage_error(result, "meshfed up", "--admin-token-file", "is not a file this process can read")
    for content in (b"short\n", b"two words here and more\n", b"\xff" * 32):
        (tmp_path / "token").write_bytes(content)
        result = meshfed_cli("up", "--dir", zone, "--admin-token-file", tmp_path / "token", *ephemeral_flags())
        one_line_error(result, str(tmp_path / "token"))
        assert (zone / "admin-token").read_bytes() == token
    assert not (zone / "api-url").exists()


def test_a_bad_value_raised_by_a_command_is_one_line(zone):
    result = meshfed_cli("zone", "token", "--dir", zone)
    one_usage_error(result, "meshfed zone token", "choose one of --read or --admin")


def test_no_arguments_prints_the_help_and_exits_2():
    result = meshfed_cli()
    assert result.returncode == 2
    assert "Usage: meshfed" in result.stdout
    assert "Traceback" not in result.stderr


def test_help_is_unchanged_and_exits_0():
    result = meshfed_cli("up", "--help")
    assert result.returncode == 0
    assert "Usage: meshfed up [OPTIONS]" in result.stdout
    assert "MESHFED_DIR" in result.stdout


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [("missing", "is not a zone directory"), ("file", "a file, not a zone directory"), ("bad-toml", "zone.toml")],
)
def test_a_bad_zone_directory_is_one_line(tmp_path, kind, fragment):
    if kind == "missing":
        directory = tmp_path / "nowhere"
    elif kind == "file":
        directory = tmp_path / "a-file"
        directory.write_text("not a zone\n")
    else:
        directory = init_zone(tmp_path / "east")
        with (directory / "zone.toml").open("a") as toml:
            toml.write("name = [\n")
    for args in (("up", "--dir", directory, *ephemeral_flags()), ("trust", "list", "--dir", directory)):
        one_line_error(meshfed_cli(*args), fragment)


def test_an_address_of_another_host_is_one_line(zone):
    # 192.0.2.1 (TEST-NET-1) is on no local interface: the bind fails here (EADDRNOTAVAIL), nothing is sent.
    flags = [*ephemeral_flags(), "--peering-address", "192.0.2.1:15440"]
    one_line_error(meshfed_cli("up", "--dir", zone, *flags), "--peering-address 192.0.2.1:15440", "cannot listen")


def test_an_api_address_in_use_is_one_line_exit_1(zone):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        address = f"127.0.0.1:{held.getsockname()[1]}"
        result = meshfed_cli("up", "--dir", zone, *ephemeral_flags(), "--api-address", address)
    line = one_line_error(result, f"--api-address {address}", "address already in use")
    assert not line.startswith("{")


def test_version_option_matches_the_command():
    by_option, by_command = meshfed_cli("--version"), meshfed_cli("version")
    assert by_option.returncode == by_command.returncode == 0
    assert by_option.stdout == by_command.stdout
    assert by_option.stdout.startswith("meshfed ")


def test_completion_scripts_and_candidates():
    for shell in ("bash", "zsh", "fish"):
        script = meshfed_cli("completion", shell)
        assert script.returncode == 0, script.stderr
        assert "_MESHFED_COMPLETE" in script.stdout
    one_usage_error(meshfed_cli("completion", "tcsh"), "meshfed completion", "'tcsh' is not one of")
    # What the bash script asks meshfed when the user presses tab after `meshfed tru`.
    env = {**os.environ, "_MESHFED_COMPLETE": "complete_bash", "COMP_WORDS": "meshfed tru", "COMP_CWORD": "1"}
    asked = subprocess.run(
        [sys.executable, "-m", "meshfed"], capture_output=True, text=True, env=env, check=False, timeout=60
    )
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.split() == ["trust"]


def test_meshfed_dir_stands_in_for_dir(zone):
    env = {**os.environ, "MESHFED_DIR": str(zone)}
    listed = subprocess.run(
        [sys.executable, "-m", "meshfed", "trust", "list", "-o", "json"],
        capture_output=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["trust_domains"][0]["trust_domain"] == "east.mesh"


def test_trust_list_json_alias_and_output_option_agree(zone):
    by_option = meshfed_cli("trust", "list", "--dir", zone, "-o", "json")
    by_alias = meshfed_cli("trust", "list", "--dir", zone, "--json")
    assert by_option.returncode == by_alias.returncode == 0
    assert json.loads(by_option.stdout)["trust_domains"] == json.loads(by_alias.stdout)["trust_domains"]


def test_zone_init_prints_json_of_what_it_made(tmp_path):
    made = meshfed_cli(
        "zone", "init", "--dir", tmp_path / "west", "--name", "west", "--trust-domain", "w.mesh", "-o", "json"
    )
    assert made.returncode == 0, made.stderr
    document = json.loads(made.stdout)
    assert document["zone"] == "west"
    assert document["trust_domain"] == "w.mesh"
    assert document["catalog"] == "embedded"
    assert Path(document["read_token_file"]).read_text().strip()
    assert Path(document["directory"]) == tmp_path / "west"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_tables_are_tab_separated_lines_when_not_a_terminal():
    piped = io.StringIO()
    print_table("zone east peerings", ["NAME", "STATE"], [["west", "ACTIVE"], ["north", "has\ttab"]], file=piped)
    assert piped.getvalue() == "NAME\tSTATE\nwest\tACTIVE\nnorth\thas tab\n"
    terminal = _Terminal()
    print_table("zone east peerings", ["NAME", "STATE"], [["west", "[red]ACTIVE"]], file=terminal)
    shown = terminal.getvalue()
    assert "zone east peerings" in shown
    assert "─" in shown
    assert "[red]ACTIVE" in shown  # cells are text, never markup


# SIGTERM to `meshfed up` at a chosen moment of its start: the script sends it to itself there.
_SIGTERM_AT = textwrap.dedent(
    """
    import os, signal, sys
    sys.argv = ["meshfed", "up", *sys.argv[2:]]
    moment = os.environ["MESHFED_TEST_SIGTERM_AT"]
    if moment == "import":
        import meshfed.cli._signals  # as the CLI's first import does, then the signal, then the rest
        os.kill(os.getpid(), signal.SIGTERM)
    import meshfed.cli
    import meshfed.cli.serve as serve

    def at(name):
        original = getattr(serve, name)
        def wrapped(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return original(*args, **kwargs)
        setattr(serve, name, wrapped)

    if moment != "import":
        at(moment)
    meshfed.cli.main()
    """
)


@pytest.mark.parametrize("moment", ["import", "check_settings", "configure_logging", "assemble_zone", "start_runtime"])
def test_sigterm_while_up_starts_is_a_clean_stop_exit_0(zone, moment):
    result = subprocess.run(
        [sys.executable, "-c", _SIGTERM_AT, "up", "--dir", str(zone), *ephemeral_flags()],
        capture_output=True,
        text=True,
        env={**os.environ, "MESHFED_TEST_SIGTERM_AT": moment},
        check=False,
        timeout=120,
    )
    assert result.returncode == ExitCode.OK, (result.returncode, result.stderr)
    assert result.returncode != 128 + signal.SIGTERM
    assert "Traceback" not in result.stderr
    assert ": API on http://" not in result.stderr  # stopped before it served
    assert not (zone / "api-url").exists()
