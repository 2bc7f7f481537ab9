"""A docker pool's options are checked before any engine is asked (no engine needed)."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from provisioners import ProvisionerOptions, provisioner_class, validate_options
from provisioners.docker import DockerOptions, DockerProvisioner


def test_registry_name_docker_loads_this_provisioner() -> None:
    assert provisioner_class("docker") is DockerProvisioner


def test_defaults_isolate_workers_and_pull_only_missing_images() -> None:
    options = validate_options("docker", {"image": "workerlease/testing:0.1.0"})

    assert isinstance(options, DockerOptions)
    # network None: the deployment's own bridge network, not the host's.
    assert (options.network, options.subnet, options.service_url) == (None, None, None)
    assert (options.cpus, options.memory, options.pids_limit) == (1.0, "1g", 512)
    assert (options.user, options.privileged) == (None, False)
    assert (options.pull, options.agent_port, options.docker_host, options.env) == (
        "missing",
        0,
        None,
        {},
    )


def test_host_network_is_allowed_explicitly_and_logged_as_unsafe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    options = validate_options("docker", {"image": "x", "network": "host"})
    assert isinstance(options, DockerOptions)

    with caplog.at_level(logging.WARNING, logger="provisioners.docker"):
        DockerProvisioner("hosted", options)

    assert [r.getMessage().split(" ", 2)[:2] for r in caplog.records] == [
        ["docker_host_network_unsafe", "pool=hosted"]
    ]


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "image"),
        ({"image": "x", "imgae": "typo"}, "imgae"),
        ({"image": "x", "pull": "sometimes"}, "pull"),
        ({"image": "x", "memory": "lots"}, "memory"),
        ({"image": "x", "cpus": 0}, "cpus"),
        ({"image": "x", "agent_port": 70000}, "agent_port"),
        ({"image": "x", "docker_host": "127.0.0.1:2375"}, "docker_host"),
        ({"image": "x", "env": {"A": 1}}, "env"),
        ({"image": "x", "network": "none"}, "network"),
        ({"image": "x", "network": "container:abc"}, "network"),
        ({"image": "x", "subnet": "10.0.0.0/33"}, "subnet"),
        ({"image": "x", "service_url": "127.0.0.1:8080"}, "service_url"),
        ({"image": "x", "pids_limit": 1}, "pids_limit"),
        ({"image": "x", "user": "a b"}, "user"),
    ],
)
def test_a_bad_option_is_refused_with_its_key(options: dict[str, object], key: str) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_options("docker", options)

    assert {str(error["loc"][0]) for error in caught.value.errors()} == {key}


def test_the_provisioner_refuses_another_provisioners_options() -> None:
    with pytest.raises(TypeError):
        DockerProvisioner("p", ProvisionerOptions())
