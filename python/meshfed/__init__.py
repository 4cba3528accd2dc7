"""meshfed: a multi-cluster service-mesh federation gateway.

Python orchestrates (trust, catalogs, federation, API, CLI); the Rust core in
``meshfed._core`` moves bytes.
"""

from importlib import metadata as _metadata

from meshfed.errors import MeshfedError

try:
    __version__ = _metadata.version("meshfed")
except _metadata.PackageNotFoundError:  # a source tree without an installed distribution
    __version__ = "0+unknown"

__all__ = ["MeshfedError", "__version__"]
