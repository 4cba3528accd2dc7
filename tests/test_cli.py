"""The ``meshfed`` command as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

import meshfed
from meshfed import _core


def meshfed_cli(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "meshfed", *map(str, args)], input=stdin, capture_output=True, check=False, timeout=120
    )


def _assert_one_line_error(result: subprocess.CompletedProcess[bytes], *fragments: str) -> None:
    assert result.returncode != 0
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_version_names_both_layers():
    result = meshfed_cli("version")
    assert result.returncode == 0
    assert result.stdout.decode().strip() == f"meshfed {meshfed.__version__} (core {_core.core_version()})"
    as_json = meshfed_cli("version", "-o", "json")
    assert orjson.loads(as_json.stdout) == {"meshfed": meshfed.__version__, "core": _core.core_version()}


# What `meshfed version` must not load: each group is imported when the command line names it.
_HEAVY = ("grpc", "httpx", "meshfed.federation", "meshfed.zone", "meshfed.catalog", "meshfed.cli.peer")


def test_version_loads_none_of_the_command_groups():
    probe = (
        "import sys\n"
        "from meshfed import cli\n"
        "sys.argv = ['meshfed', 'version']\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        f"print(sorted(m for m in sys.modules if m.startswith({_HEAVY!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=True, text=True).stdout
    assert out.splitlines() == [f"meshfed {meshfed.__version__} (core {_core.core_version()})", "[]"]


def test_a_command_group_loads_when_named():
    probe = (
        "import sys\n"
        "from meshfed import cli\n"
        "sys.argv = ['meshfed', 'peer', '--help']\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('meshfed.cli.peer' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=True, text=True).stdout
    assert out.splitlines()[-1] == "True"
    assert "token" in out  # peer's own subcommands are listed


def test_zone_init_then_issue_export_import(tmp_path):
    east, west = tmp_path / "east", tmp_path / "west"
    assert meshfed_cli("zone", "init", "--dir", east, "--name", "east", "--trust-domain", "east.mesh").returncode == 0
    assert meshfed_cli("zone", "init", "--dir", west, "--name", "west", "--trust-domain", "west.mesh").returncode == 0

    issued = meshfed_cli(
        "trust",
        "issue",
        "--dir",
        east,
        "--spiffe-id",
        "spiffe://east.mesh/ns/default/sa/web",
        "--out",
        tmp_path / "web.pem",
        "--key-out",
        tmp_path / "web.key",
        "--ttl",
        "1h",
    )
    assert issued.returncode == 0, issued.stderr
    assert (tmp_path / "web.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "web.pem").read_bytes().count(b"BEGIN CERTIFICATE") == 2

    exported = meshfed_cli("trust", "export", "--dir", east)
    assert exported.returncode == 0
    assert json.loads(exported.stdout)["keys"][0]["use"] == "x509-svid"
    pem = meshfed_cli("trust", "export", "--dir", east, "--format", "pem")
    assert pem.stdout.startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"PRIVATE KEY" not in exported.stdout + pem.stdout + issued.stdout + issued.stderr

    imported = meshfed_cli("trust", "import", "--dir", west, "--trust-domain", "east.mesh", "-", stdin=exported.stdout)
    assert imported.returncode == 0, imported.stderr

    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", "/dev/stdin", "-untrusted", tmp_path / "web.pem", tmp_path / "web.pem"],
        input=pem.stdout,
        capture_output=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("zone", "init", "--dir", "{tmp}/z", "--name", "Bad Name", "--trust-domain", "x.mesh"), ("DNS label",)),
        (("trust", "export", "--dir", "{tmp}/nowhere"), ("not a zone directory", "meshfed zone init")),
        (
            (
                "trust",
                "issue",
                "--dir",
                "{tmp}/east",
                "--spiffe-id",
                "spiffe://west.mesh/x",
                "--out",
                "{tmp}/o",
                "--key-out",
                "{tmp}/k",
            ),
            ("outside this zone's trust domain",),
        ),
        (
            (
                "trust",
                "issue",
                "--dir",
                "{tmp}/east",
                "--spiffe-id",
                "https://east.mesh/x",
                "--out",
                "{tmp}/o",
                "--key-out",
                "{tmp}/k",
            ),
            ("must start with 'spiffe://'",),
        ),
        (
            ("trust", "import", "--dir", "{tmp}/east", "--trust-domain", "west.mesh", "{tmp}/missing.json"),
            ("missing.json",),
        ),
        (
            ("trust", "import", "--dir", "{tmp}/east", "--trust-domain", "west.mesh", "{tmp}/east/zone.toml"),
            ("neither PEM nor JSON",),
        ),
        (
            ("zone", "init", "--dir", "{tmp}/east", "--name", "east", "--trust-domain", "east.mesh"),
            ("already holds a zone",),
        ),
    ],
)
def test_errors_are_one_line_without_traceback(tmp_path, args, fragments):
    assert (
        meshfed_cli(
            "zone", "init", "--dir", tmp_path / "east", "--name", "east", "--trust-domain", "east.mesh"
        ).returncode
        == 0
    )
    result = meshfed_cli(*(arg.format(tmp=tmp_path) for arg in args))
    _assert_one_line_error(result, *fragments)
    assert not (tmp_path / "o").exists()
    assert not (tmp_path / "k").exists()


def test_bad_ttl_is_a_usage_error(tmp_path):
    meshfed_cli("zone", "init", "--dir", tmp_path / "east", "--name", "east", "--trust-domain", "east.mesh")
    result = meshfed_cli(
        "trust",
        "issue",
        "--dir",
        tmp_path / "east",
        "--spiffe-id",
        "spiffe://east.mesh/a",
        "--out",
        tmp_path / "o",
        "--key-out",
        tmp_path / "k",
        "--ttl",
        "soon",
    )
    assert result.returncode == 2
    assert b"not a duration" in result.stderr
    assert b"Traceback" not in result.stderr


def test_help_works_for_every_group():
    for group in ((), ("zone",), ("trust",), ("trust", "issue"), ("demo",)):
        result = meshfed_cli(*group, "--help")
        assert result.returncode == 0, group
        assert b"Usage" in result.stdout


def test_meshfed_up_raises_the_open_file_limit_for_many_egress_listeners():
    """Each imported service port holds a listening socket; a soft limit of 1024 would cap the imports."""
    script = (
        "import resource\n"
        "from meshfed.runtime import raise_open_file_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "raised = raise_open_file_limit()\n"
        "print(raised, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    raised, now, hard = (int(value) for value in result.stdout.split())
    assert raised == now
    assert now == hard or (hard == -1 and now > 256)
