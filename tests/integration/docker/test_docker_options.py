"""A docker pool's options are checked before any engine is asked (no engine needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from provisioners import ProvisionerOptions, provisioner_class, validate_options
from provisioners.docker import DockerOptions, DockerProvisioner


def test_registry_name_docker_loads_this_provisioner() -> None:
    assert provisioner_class("docker") is DockerProvisioner


def test_defaults_use_the_host_network_and_pull_only_missing_images() -> None:
    options = validate_options("docker", {"image": "workerlease/testing:0.1.0"})

    assert isinstance(options, DockerOptions)
    assert (options.network, options.pull, options.agent_port) == ("host", "missing", 0)
    assert (options.docker_host, options.cpus, options.memory, options.env) == (
        None,
        None,
        None,
        {},
    )


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
    ],
)
def test_a_bad_option_is_refused_with_its_key(options: dict[str, object], key: str) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_options("docker", options)

    assert {str(error["loc"][0]) for error in caught.value.errors()} == {key}


def test_the_provisioner_refuses_another_provisioners_options() -> None:
    with pytest.raises(TypeError):
        DockerProvisioner("p", ProvisionerOptions())
