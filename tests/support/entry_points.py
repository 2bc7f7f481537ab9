"""Register the test provisioners the way a third-party package does: entry points.

A distribution's metadata (``*.dist-info`` with ``entry_points.txt``) is written to a
temporary directory on ``sys.path``, so ``importlib.metadata`` finds the group
``workerlease.provisioners`` exactly as it would for an installed package, and the
registry loads the classes through ``EntryPoint.load()``.
"""

from __future__ import annotations

import atexit
import importlib
import shutil
import sys
import tempfile
from pathlib import Path

from provisioners import ENTRY_POINT_GROUP

DISTRIBUTION = "workerlease_test_doubles"

TEST_PROVISIONERS = {
    "fake": "tests.support.fakes:FakeProvisioner",
    "faulty": "tests.integration.crash.doubles:FaultyProvisioner",
    "not-a-provisioner": "tests.support.fakes:FakeOptions",
}


_installed: list[Path] = []


def install_distribution() -> Path:
    """Write the distribution's metadata once per process, put it on ``sys.path``."""
    if _installed:
        return _installed[0]
    root = Path(tempfile.mkdtemp(prefix="wl-entry-points-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    info = root / f"{DISTRIBUTION}-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DISTRIBUTION}\nVersion: 0.0.0\n")
    entries = TEST_PROVISIONERS.items()
    lines = [f"[{ENTRY_POINT_GROUP}]", *(f"{name} = {target}" for name, target in entries)]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    sys.path.append(str(root))
    importlib.invalidate_caches()
    _installed.append(root)
    return root
