"""Build the worker images: ``build_image("testing")`` -> ``"workerlease/testing:0.1.0"``.

Each image is a folder ``images/<name>/`` with a ``Dockerfile``; the build context is
``images/`` itself so every Dockerfile can ``COPY agent/...``. Builds go through the
``docker`` CLI (``docker build``), which reads ``DOCKER_HOST`` like the provisioner does.

The ``testing`` image sits on ``workerlease/base:bookworm``, a Debian root file system
made with debootstrap and imported into the engine, because this project cannot rely on
pulling from a registry. The base is built only when the engine does not have it
(about 40 s); the ``docker build`` on top of it is cached by the engine, so calling
``build_image("testing")`` again is cheap and still picks up a changed agent.

Shell use: ``python -m images.build [NAME ...]`` (default: ``testing``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from service import __version__

log = logging.getLogger(__name__)

IMAGES_DIR = Path(__file__).resolve().parent
BASE_TAG = "workerlease/base:bookworm"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("WORKERLEASE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# python3-minimal alone lacks http.server; the stdlib package brings it.
BASE_PACKAGES = ("python3-minimal", "libpython3.11-stdlib")
# Images whose Dockerfile needs a Windows engine.
WINDOWS_IMAGES = frozenset({"windows"})


class ImageBuildError(RuntimeError):
    """An image could not be built; the message carries the tool's own words."""


def image_names() -> list[str]:
    """Every image this folder can build (a subfolder with a Dockerfile)."""
    return sorted(p.parent.name for p in IMAGES_DIR.glob("*/Dockerfile"))


def image_tag(name: str) -> str:
    return f"workerlease/{name}:{__version__}"


def build_image(name: str, *, verbose: bool = False) -> str:
    """Build ``images/<name>`` and return its tag ``workerlease/<name>:<version>``.

    Builds the debootstrap base first when ``name`` is ``testing`` and the engine lacks
    it. ``verbose`` streams the tools' output to stderr instead of capturing it.
    Raises :class:`ImageBuildError` (unknown name, no engine, failed build).
    """
    if name not in image_names():
        raise ImageBuildError(f"unknown image {name!r}; known: {', '.join(image_names())}")
    if name in WINDOWS_IMAGES and _engine_os() != "windows":
        raise ImageBuildError(f"image {name!r} can only be built on a Windows Docker engine")
    if name == "testing":
        ensure_base_image(verbose=verbose)
    tag = image_tag(name)
    _run(
        [
            "docker",
            "build",
            "--tag",
            tag,
            "--label",
            f"org.opencontainers.image.version={__version__}",
            "--file",
            str(IMAGES_DIR / name / "Dockerfile"),
            str(IMAGES_DIR),
        ],
        what=f"docker build of {tag}",
        verbose=verbose,
    )
    log.info("image_built tag=%s", tag)
    return tag


def ensure_base_image(*, verbose: bool = False) -> str:
    """Import ``workerlease/base:bookworm`` from a debootstrap root unless present."""
    if image_exists(BASE_TAG):
        return BASE_TAG
    debootstrap = shutil.which("debootstrap") or _install_debootstrap()
    with tempfile.TemporaryDirectory(prefix="workerlease-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                DEBIAN_SUITE,
                str(rootfs),
                DEBIAN_MIRROR,
            ],
            what="debootstrap",
            verbose=verbose,
        )
        _slim_rootfs(rootfs)
        _import_rootfs(rootfs, BASE_TAG)
    log.info("base_image_imported tag=%s", BASE_TAG)
    return BASE_TAG


def image_exists(tag: str) -> bool:
    result = subprocess.run(
        ["docker", "image", "inspect", tag], capture_output=True, text=True, check=False
    )
    if result.returncode == 0:
        return True
    if "No such image" in result.stderr or "No such object" in result.stderr:
        return False
    raise ImageBuildError(f"docker image inspect {tag} failed: {result.stderr.strip()}")


def _engine_os() -> str:
    result = subprocess.run(
        ["docker", "info", "--format", "{{.OSType}}"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ImageBuildError(f"no Docker engine answers: {result.stderr.strip()}")
    return result.stdout.strip()


def _install_debootstrap() -> str:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ImageBuildError("debootstrap is missing; install it (apt-get install debootstrap)")
    _run(["apt-get", "install", "-y", "-qq", "debootstrap"], what="apt-get install debootstrap")
    found = shutil.which("debootstrap")
    if not found:
        raise ImageBuildError("debootstrap installed but not on PATH")
    return found


def _slim_rootfs(rootfs: Path) -> None:
    """Drop the downloaded .debs and package lists: the image never runs apt."""
    for folder in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / folder).glob("*"):
            if entry.is_file():
                entry.unlink()


def _import_rootfs(rootfs: Path, tag: str) -> None:
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    try:
        result = subprocess.run(
            ["docker", "import", "--change", "ENV LANG=C.UTF-8", "-", tag],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        tar.stdout.close()
        tar_rc = tar.wait()
    if tar_rc != 0 or result.returncode != 0:
        raise ImageBuildError(f"docker import of {tag} failed (tar rc={tar_rc}): {result.stderr}")


def _run(cmd: list[str], *, what: str, verbose: bool = False) -> None:
    # No buildx plugin on Debian's engine: ask for the classic builder explicitly so a
    # newer CLI does not try BuildKit and stop.
    env = {**os.environ}
    env.setdefault("DOCKER_BUILDKIT", "0")
    env.setdefault("DEBIAN_FRONTEND", "noninteractive")
    log.info("image_build_step what=%s cmd=%s", what, " ".join(cmd))
    try:
        result = subprocess.run(
            cmd,
            env=env,
            stdout=sys.stderr if verbose else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{what}: {cmd[0]} is not installed") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stdout or "").splitlines()[-25:])
        raise ImageBuildError(f"{what} failed (exit {result.returncode}):\n{tail}")


def main(argv: list[str] | None = None) -> int:
    names = (sys.argv[1:] if argv is None else argv) or ["testing"]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in names:
        try:
            print(build_image(name, verbose=True))
        except ImageBuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
