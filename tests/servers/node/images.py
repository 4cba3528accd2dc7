"""Container images for the one-node test cluster, made without a registry.

No container registry is reachable from the machines the tests run on (only
package registries), so the images are assembled here as OCI image archives
(``ctr images import`` loads them):

* ``pause_image``: the pod sandbox, one static binary built from pause.c.
* ``meshfed_image``: what gateways/Dockerfile makes, from Debian instead of
  Docker Hub: a bookworm minbase rootfs with Debian's python3 (debootstrap,
  from Debian's mirror), a venv with the project's dependencies (pip, from
  PyPI), and on top the wheel of the working tree (``maturin build
  --release``). The rootfs and the dependency layer are cached per user
  outside the clone (keyed by their inputs); only the wheel layer is made on
  each run.

Builds that reach a package registry get the machine's CA bundle at build
time only; it never lands in a layer.
"""

from __future__ import annotations

import email.parser
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "meshfed" / "images"
SUITE = "bookworm"
# Debian's python3 is 3.11, which the abi3-py311 extension supports.
BASE_PACKAGES = ("python3", "python3-venv")
VENV = "/opt/meshfed"
UID = 10001
PAUSE_REF = "meshfed.test/pause:1"
MESHFED_REPOSITORY = "meshfed.test/meshfed"


class ImageError(RuntimeError):
    pass


def _run(*cmd: str | os.PathLike[str], **kw: object) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        **kw,  # type: ignore[call-overload]
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise ImageError(f"{Path(str(cmd[0])).name} failed ({proc.returncode}): " + " | ".join(tail))
    return str(proc.stdout)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = 0
    info.uname = info.gname = ""
    return info


def tar_tree(root: Path, out: Path, members: Iterable[str] = (".",)) -> None:
    """An uncompressed layer tar of ``members`` (paths relative to ``root``), owners kept."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            tar.add(root / member, arcname=member, filter=_normalise)


def write_oci_archive(out: Path, ref: str, layers: list[Path], config: dict[str, object]) -> Path:
    """An OCI image layout as a tar (index + manifest + config + layers), for ``ctr images import``."""
    blobs: list[tuple[str, Path | bytes]] = []
    diff_ids, layer_descs = [], []
    for layer in layers:
        digest = "sha256:" + _sha256_file(layer)
        diff_ids.append(digest)
        layer_descs.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": digest,
                "size": layer.stat().st_size,
            }
        )
        blobs.append((digest, layer))
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_bytes = json.dumps(image_config, sort_keys=True).encode()
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    blobs.append((config_digest, config_bytes))
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config_bytes),
        },
        "layers": layer_descs,
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    blobs.append((manifest_digest, manifest_bytes))
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": ref,
                    "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1],
                },
            }
        ],
    }

    def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    tmp = out.with_suffix(".part")
    with tarfile.open(tmp, "w") as tar:
        add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add_bytes(tar, "index.json", json.dumps(index).encode())
        for digest, blob in blobs:
            name = "blobs/sha256/" + digest.split(":", 1)[1]
            if isinstance(blob, bytes):
                add_bytes(tar, name, blob)
            else:
                tar.add(blob, arcname=name, filter=_normalise)
    tmp.rename(out)
    return out


def pause_image(workdir: Path) -> tuple[str, Path]:
    """(reference, archive) of the sandbox image: pause.c, static."""
    stage = workdir / "pause-rootfs"
    stage.mkdir(parents=True, exist_ok=True)
    _run("gcc", "-static", "-O2", "-s", "-o", stage / "pause", HERE / "pause.c")
    layer = workdir / "pause-layer.tar"
    tar_tree(stage, layer, ["pause"])
    archive = write_oci_archive(
        workdir / "pause.oci.tar", PAUSE_REF, [layer], {"Entrypoint": ["/pause"], "User": "65535:65535"}
    )
    return PAUSE_REF, archive


# -- the meshfed image -------------------------------------------------------------


def _mirror() -> str:
    """Debian mirror the machine's apt uses (deb822 or one-line sources)."""
    for path in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if line.startswith("URIs:") and len(words) > 1 and "security" not in words[1]:
                return words[1]
            if line.startswith("deb ") and len(words) > 2 and "security" not in words[1]:
                return words[1] if not words[1].startswith("[") else words[2]
    return "http://deb.debian.org/debian"


def _ca_bundle() -> Path:
    for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        if os.environ.get(name) and Path(os.environ[name]).is_file():
            return Path(os.environ[name])
    return Path("/etc/ssl/certs/ca-certificates.crt")


def _base_rootfs() -> Path:
    """Cached bookworm minbase rootfs with python3 (debootstrap takes a minute or two)."""
    mirror = _mirror()
    key = hashlib.sha256(f"{SUITE} minbase {','.join(BASE_PACKAGES)} {mirror}".encode()).hexdigest()[:12]
    base = CACHE / f"rootfs-{SUITE}-{key}"
    if (base / ".complete").exists():
        return base
    if not shutil.which("debootstrap"):
        raise ImageError("debootstrap is missing (apt-get install debootstrap)")
    if not (base / ".bootstrapped").exists():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        packages = "--include=" + ",".join(BASE_PACKAGES)
        _run("debootstrap", "--variant=minbase", packages, SUITE, base / "rootfs", mirror)
        (base / ".bootstrapped").touch()
    # Nothing of the build machine in the image: apt lists, caches, its resolver.
    for junk in ["var/lib/apt/lists", "var/cache/apt/archives"]:
        for child in (base / "rootfs" / junk).glob("*"):
            if child.is_file():
                child.unlink()
    (base / "rootfs/etc/resolv.conf").unlink(missing_ok=True)
    (base / "rootfs/etc/hostname").write_text("meshfed\n")
    # The meshfed user (numeric in the pod spec) and its state directory.
    with (base / "rootfs/etc/passwd").open("a") as f:
        f.write(f"meshfed:x:{UID}:{UID}::/var/lib/meshfed:/usr/sbin/nologin\n")
    with (base / "rootfs/etc/group").open("a") as f:
        f.write(f"meshfed:x:{UID}:\n")
    state = base / "rootfs/var/lib/meshfed"
    state.mkdir(mode=0o750)
    os.chown(state, UID, UID)
    tar_tree(base / "rootfs", base / "layer.tar")
    (base / ".complete").touch()
    return base


def _in_overlay_chroot(rootfs: Path, workdir: Path, script: str, binds: dict[Path, str]) -> Path:
    """Runs ``script`` (sh) chrooted in an overlay of ``rootfs`` in a private mount namespace
    (gone with the process, nothing mounted on the host); returns the overlay's upper dir."""
    upper, work, merged = workdir / "upper", workdir / "work", workdir / "merged"
    for d in (upper, work, merged):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    lines = [f'mount -t overlay overlay -o "lowerdir={rootfs},upperdir={upper},workdir={work}" "{merged}"']
    for src, dst in binds.items():
        target = f"{merged}{dst}"
        if src.is_dir():
            lines.append(f'mkdir -p "{target}" && mount --bind "{src}" "{target}"')
        else:
            lines.append(f'mkdir -p "$(dirname "{target}")" && : > "{target}" && mount --bind "{src}" "{target}"')
    lines.append(f'mount -t proc proc "{merged}/proc"')
    lines.append(f'exec chroot "{merged}" /bin/sh -ec "$0"')
    _run(
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-ec",
        " && ".join(lines),
        script,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"},
    )
    return upper


def _wheel(workdir: Path) -> Path:
    """The project's wheel, built from the working tree (maturin, release)."""
    proto = ROOT / "python/meshfed/federation/_proto/peering_pb2_grpc.py"
    venv_python = ROOT / ".venv/bin/python"
    if not proto.exists():
        _run(venv_python, ROOT / "federation/proto/generate.py", cwd=ROOT)
    out = workdir / "dist"
    shutil.rmtree(out, ignore_errors=True)
    maturin = ROOT / ".venv/bin/maturin"
    _run(maturin, "build", "--release", "--locked", "--quiet", "--interpreter", "python3.11", "--out", out, cwd=ROOT)
    wheels = list(out.glob("meshfed-*.whl"))
    if len(wheels) != 1:
        raise ImageError(f"maturin built {len(wheels)} wheels in {out}")
    return wheels[0]


def _requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(zf.read(name).decode())
    return sorted(r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r)


def _deps_layer(base: Path, requirements: list[str], workdir: Path) -> Path:
    """Cached layer: a venv at /opt/meshfed with the project's dependencies (from PyPI)."""
    key = hashlib.sha256(("\n".join([base.name, *requirements])).encode()).hexdigest()[:12]
    layer = CACHE / f"deps-{key}.tar"
    if layer.exists():
        return layer
    (workdir / "requirements.txt").write_text("\n".join(requirements) + "\n")
    pip_cache = CACHE / "pip"
    pip_cache.mkdir(parents=True, exist_ok=True)
    script = (
        f"python3 -m venv {VENV} && "
        f"PIP_DISABLE_PIP_VERSION_CHECK=1 {VENV}/bin/pip install --quiet --cert /run/build-ca.crt "
        f"--cache-dir /run/pip-cache --only-binary=:all: -r /run/requirements.txt && "
        f"find {VENV} -name __pycache__ -prune -exec rm -rf {{}} +"
    )
    binds = {
        _ca_bundle(): "/run/build-ca.crt",
        Path("/etc/resolv.conf").resolve(): "/etc/resolv.conf",
        pip_cache: "/run/pip-cache",
        workdir / "requirements.txt": "/run/requirements.txt",
    }
    # The overlay keeps the cached rootfs untouched; only the venv is taken from its upper dir.
    upper = _in_overlay_chroot(base / "rootfs", workdir / "deps", script, binds)
    part = layer.with_suffix(".part")
    tar_tree(upper, part, [VENV.lstrip("/")])
    part.rename(layer)
    shutil.rmtree(upper, ignore_errors=True)
    return layer


def _wheel_layer(wheel: Path, workdir: Path) -> Path:
    """Top layer: the wheel unpacked into the venv's site-packages, plus its console script."""
    stage = workdir / "wheel-stage"
    shutil.rmtree(stage, ignore_errors=True)
    site = stage / VENV.lstrip("/") / "lib/python3.11/site-packages"
    bindir = stage / VENV.lstrip("/") / "bin"
    site.mkdir(parents=True)
    bindir.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
        for info in zf.infolist():  # keep the extension module executable bits
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                (site / info.filename).chmod(mode)
        entry = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = zf.read(entry).decode()
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[console_scripts]" and "=" in line:
            name, target = (s.strip() for s in line.split("=", 1))
            module, func = target.split(":")
            script = bindir / name
            script.write_text(f"#!{VENV}/bin/python\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
            script.chmod(0o755)
    layer = workdir / "wheel-layer.tar"
    tar_tree(stage, layer, [VENV.lstrip("/")])
    return layer


def meshfed_image(workdir: Path) -> tuple[str, Path]:
    """(reference, archive) of the meshfed image of the working tree."""
    workdir.mkdir(parents=True, exist_ok=True)
    base = _base_rootfs()
    wheel = _wheel(workdir)
    deps = _deps_layer(base, _requirements(wheel), workdir)
    top = _wheel_layer(wheel, workdir)
    tag = "t" + hashlib.sha256(f"{base.name} {deps.name} {_sha256_file(top)}".encode()).hexdigest()[:12]
    ref = f"{MESHFED_REPOSITORY}:{tag}"
    config: dict[str, object] = {
        "User": f"{UID}:{UID}",
        "WorkingDir": "/var/lib/meshfed",
        "Entrypoint": ["meshfed"],
        "Cmd": ["--help"],
        "Env": [
            f"PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            f"VIRTUAL_ENV={VENV}",
            "PYTHONDONTWRITEBYTECODE=1",
            "PYTHONUNBUFFERED=1",
            "HOME=/tmp",
        ],
    }
    archive = write_oci_archive(workdir / "meshfed.oci.tar", ref, [base / "layer.tar", deps, top], config)
    return ref, archive


if __name__ == "__main__":  # manual: python tests/servers/node/images.py <workdir>
    import sys
    import time

    t = time.monotonic()
    d = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    print(pause_image(d))
    print(meshfed_image(d), f"{time.monotonic() - t:.0f}s")
