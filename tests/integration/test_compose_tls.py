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


def _api_replicas(services: dict[str, Any]) -> dict[str, int]:
    """Each API replica's port; none publishes it."""
    ports = {}
    for name, service in services.items():
        command = service.get("command", [])
        if command[:1] == ["serve"]:
            assert "ports" not in service, name
            ports[name] = int(command[command.index("--port") + 1])
    assert ports
    return ports


def _networks(service: dict[str, Any]) -> set[str]:
    networks = service.get("networks", [])
    return set(networks)  # a list of names, or a mapping of names to settings


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
    upstream = dict(re.findall(r"^\s*server ([a-z0-9-]+):(\d+)", conf, re.M))

    assert {name: int(port) for name, port in upstream.items()} == _api_replicas(services)
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"proxy"}
    assert services["proxy"]["ports"] == ["443:443"]
    assert all("network_mode" not in service for service in services.values())


def test_the_database_is_on_an_internal_network_workers_cannot_join(
    services: dict[str, Any],
) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    assert compose["networks"]["db"]["internal"] is True
    assert _networks(services["postgres"]) == {"db"}
    joined = {name for name, service in services.items() if "db" in _networks(service)}
    assert joined == {"postgres", "api-1", "api-2", "scheduler"}
    assert "db" not in _networks(services["proxy"])


def test_no_secret_is_written_in_the_compose_file() -> None:
    text = COMPOSE.read_text()
    # A YAML value after a secret-looking key must be a ${...} reference.
    assert not re.search(r"(?i)(password|token|key): +[^$\s{]", text)
    for name in ("DB_PASSWORD", "ADMIN_TOKEN", "ENCRYPTION_KEY", "METRICS_TOKEN"):
        assert f"${{WORKERLEASE_{name}:?" in text


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
    # The upstreams are compose service names; here they only need to resolve.
    conf = re.sub(r"server api-\d+:", "server 127.0.0.1:", conf)
    (tmp_path / "nginx.conf").write_text(conf)

    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
