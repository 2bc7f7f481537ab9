"""The house's rules, checked against the code: who may import the provisioners."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service"
SDKS = ("docker", "boto3", "botocore")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules a file imports at any level (function-local imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _service_graph() -> dict[str, set[str]]:
    files = [p for p in SERVICE.rglob("*.py") if "migrations" not in p.parts]
    modules = {_module_name(p): p for p in files}
    return {
        name: {
            imported
            for imported in _imports(path)
            if imported in modules or imported.split(".")[0] in ("provisioners", *SDKS)
        }
        for name, path in modules.items()
    }


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        module = todo.pop()
        for imported in graph.get(module, ()):
            if imported not in seen:
                seen.add(imported)
                todo.append(imported)
    return seen


def _is_provisioner_module(name: str) -> bool:
    return name == "provisioners" or name.startswith("provisioners.")


def test_only_the_passes_import_provisioners() -> None:
    graph = _service_graph()
    importers = {m for m, imported in graph.items() if any(map(_is_provisioner_module, imported))}
    assert importers, "the check found no importer at all: it is not reading the code"
    assert {m for m in importers if not m.startswith("service.passes.")} == set()


def test_no_view_reaches_a_provisioner_the_passes_or_the_scheduler() -> None:
    graph = _service_graph()
    views = [m for m in graph if m.startswith("service.api")]
    assert len(views) >= 6
    for view in views:
        reached = _reach(graph, view)
        assert not any(map(_is_provisioner_module, reached)), view
        assert not {m for m in reached if m.startswith(("service.passes", "service.scheduler"))}


def test_nothing_in_service_imports_a_cloud_sdk() -> None:
    for name, imported in _service_graph().items():
        assert not {m for m in imported if m.split(".")[0] in SDKS}, name


def test_the_web_app_loads_without_the_provisioner_package() -> None:
    """The same rule at run time: build the app and look at what Python loaded."""
    probe = (
        "import sys\n"
        "from service.app import create_app\n"
        "from service.config import config_from_dict\n"
        "create_app(config_from_dict({'database_url': 'sqlite://', 'admin_token': 'x' * 24}))\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'provisioners'\n"
        "                or m.startswith(('service.passes', 'service.scheduler')))\n"
        "print(','.join(loaded))\n"
    )
    assert _printed_by(probe) == ""


def test_the_domain_and_the_replay_load_no_web_framework() -> None:
    """``workerlease simulate`` runs the domain without the HTTP layer: the domain's errors
    carry no Flask (which was ~0.1 s of every replay's start)."""
    probe = (
        "import sys\n"
        "import service.simulate\n"
        "web = sorted(m for m in sys.modules if m.split('.')[0] in ('flask', 'werkzeug'))\n"
        "print(','.join(web))\n"
    )
    assert _printed_by(probe) == ""


def _printed_by(probe: str) -> str:
    """What ``probe`` prints, run in a fresh interpreter (what it loads is its own)."""
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
