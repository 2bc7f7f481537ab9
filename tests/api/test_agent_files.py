"""``GET /v1/agent/<name>``: what a worker's boot script fetches (provisioners/userdata.py)."""

from __future__ import annotations

from importlib.resources import files

from tests.conftest import Service


def test_the_agent_and_its_installers_are_served_as_they_are(svc: Service) -> None:
    for name in ("workerlease_agent.py", "install.sh", "install.ps1"):
        answer = svc.client.get(f"/v1/agent/{name}")
        assert answer.status_code == 200
        assert answer.data == files("images.agent").joinpath(name).read_bytes()
    for name in ("README.md", "__init__.py", "..%2Fservice%2Fconfig.py"):
        assert svc.client.get(f"/v1/agent/{name}").status_code == 404
