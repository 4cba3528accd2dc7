"""Generate the Python modules of the peering protocol into ``python/meshfed/federation/_proto/``.

Run from anywhere: ``python federation/proto/generate.py`` (needs grpcio-tools).
The output is generated, not committed (it is in .gitignore); ``make`` runs this
before building so a fresh clone works.

protoc names Python modules after the .proto's path (``meshfed.federation.v1``),
which is the protocol's package, not where meshfed keeps the code; the one
import line between the two generated modules is rewritten to the real place.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

PROTO_ROOT = Path(__file__).resolve().parent
REPO = PROTO_ROOT.parents[1]
PROTO = PROTO_ROOT / "meshfed" / "federation" / "v1" / "peering.proto"
OUTPUT = REPO / "python" / "meshfed" / "federation" / "_proto"
PROTOC_PACKAGE = "meshfed.federation.v1"
PYTHON_PACKAGE = "meshfed.federation._proto"


def generate() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        well_known = Path(protoc.__file__).parent / "_proto"
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"--proto_path={PROTO_ROOT}",
                f"--proto_path={well_known}",
                f"--python_out={scratch}",
                f"--pyi_out={scratch}",
                f"--grpc_python_out={scratch}",
                str(PROTO),
            ]
        )
        if status != 0:
            sys.exit(f"protoc failed on {PROTO} (status {status})")
        generated = Path(scratch, *PROTOC_PACKAGE.split("."))
        staging = OUTPUT.with_name("_proto.new")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for source in sorted(generated.iterdir()):
            text = source.read_text().replace(f"from {PROTOC_PACKAGE} import", f"from {PYTHON_PACKAGE} import")
            (staging / source.name).write_text(text)
        (staging / "__init__.py").write_text('"""Generated from federation/proto by federation/proto/generate.py."""\n')
        shutil.rmtree(OUTPUT, ignore_errors=True)
        staging.rename(OUTPUT)
    print(f"generated {OUTPUT.relative_to(REPO)} from {PROTO.relative_to(REPO)}")


if __name__ == "__main__":
    generate()
