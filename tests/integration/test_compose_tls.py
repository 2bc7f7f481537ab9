"""infra/compose.yaml: TLS (nginx) in front of the API replicas, and no other way in.

Compose is not run here (no images can be pulled); the file is checked as YAML and the
proxy's config with ``nginx -t`` when nginx is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
COMPOSE = INFRA / "compose.yaml"
NGINX_CONF = INFRA / "compose.nginx.conf"


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def _api_ports(services: dict[str, Any]) -> dict[str, int]:
    """Each API replica's port, checking that it listens on 127.0.0.1 only."""
    ports = {}
    for name, service in services.items():
        command = service.get("command", [])
        if command[:1] == ["serve"]:
            assert command[command.index("--host") + 1] == "127.0.0.1", name
            ports[name] = int(command[command.index("--port") + 1])
    assert ports
    return ports


def test_the_proxy_serves_tls_with_the_certificate_from_compose_secrets(
    services: dict[str, Any],
) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    proxy = services["proxy"]
    conf = NGINX_CONF.read_text()

    assert "./compose.nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    assert sorted(proxy["secrets"]) == ["tls_cert", "tls_key"]
    assert "WORKERLEASE_TLS_CERT_FILE" in compose["secrets"]["tls_cert"]["file"]
    assert "WORKERLEASE_TLS_KEY_FILE" in compose["secrets"]["tls_key"]["file"]
    assert re.search(r"^\s*ssl_certificate /run/secrets/tls_cert;", conf, re.M)
    assert re.search(r"^\s*ssl_certificate_key /run/secrets/tls_key;", conf, re.M)
    assert re.findall(r"^\s*listen (\S+)", conf, re.M) == ["443", "[::]:443"]
    assert re.search(r"^\s*ssl_protocols TLSv1.2 TLSv1.3;", conf, re.M)


def test_the_api_is_reachable_from_outside_only_through_the_proxy(
    services: dict[str, Any],
) -> None:
    conf = NGINX_CONF.read_text()
    upstream = re.findall(r"^\s*server 127\.0\.0\.1:(\d+)", conf, re.M)

    assert sorted(int(p) for p in upstream) == sorted(_api_ports(services).values())
    assert "listen_addresses=127.0.0.1" in services["postgres"]["command"]


def test_metrics_are_not_served_through_the_proxy() -> None:
    conf = NGINX_CONF.read_text()

    assert re.search(r"location = /metrics \{\s*return 404;", conf)
    assert re.search(r"location \^~ /metrics/ \{\s*return 404;", conf)


def test_nginx_accepts_the_proxy_config(tmp_path: Path) -> None:
    nginx, openssl = shutil.which("nginx"), shutil.which("openssl")
    if not nginx or not openssl:
        pytest.fail("nginx or openssl is missing: run .ci/ensure-nginx (make test does)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subject = ["-subj", "/CN=workerlease.test", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *subject],
        check=True,
        capture_output=True,
        timeout=60,
    )
    conf = NGINX_CONF.read_text()
    conf = conf.replace("/run/secrets/tls_cert", str(cert))
    conf = conf.replace("/run/secrets/tls_key", str(key))
    conf = conf.replace("pid /tmp/nginx.pid", f"pid {tmp_path / 'nginx.pid'}")
    (tmp_path / "nginx.conf").write_text(conf)

    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
