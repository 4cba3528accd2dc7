"""The wheel the project builds holds everything the installed package imports.

The peering protocol's stubs are generated, never committed, and so gitignored;
maturin leaves gitignored files out of wheels unless ``pyproject.toml`` includes
them by name. Without them the installed CLI fails at its first import of the
peering code, which is what users of a wheel (and of the image) run.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STUBS = {"__init__.py", "peering_pb2.py", "peering_pb2.pyi", "peering_pb2_grpc.py"}


def test_the_wheel_holds_the_generated_protocol_stubs(tmp_path: Path) -> None:
    maturin = Path(sys.executable).parent / "maturin"
    subprocess.run(
        [str(maturin), "build", "--release", "--locked", "--quiet", "--out", str(tmp_path)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=900,
    )
    (wheel,) = tmp_path.glob("meshfed-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    stubs = {name.removeprefix("meshfed/federation/_proto/") for name in names if "/_proto/" in name}
    assert stubs == STUBS
    assert "meshfed/federation/peering_store.py" in names
