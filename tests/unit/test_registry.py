"""The provisioner registry: built-ins by name, third-party provisioners by entry point."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from provisioners import BUILTIN, ENTRY_POINT_GROUP, UnknownProvisionerError, provisioner_class
from tests.support.entry_points import DISTRIBUTION
from tests.support.fakes import FakeProvisioner


def test_a_third_party_provisioner_is_loaded_through_its_entry_point() -> None:
    assert "fake" not in BUILTIN
    (entry,) = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == "fake"]
    assert entry.dist is not None and entry.dist.name == DISTRIBUTION
    assert provisioner_class("fake") is FakeProvisioner


def test_an_entry_point_that_is_not_a_provisioner_is_refused_with_its_target() -> None:
    with pytest.raises(TypeError, match=r"tests\.support\.fakes:FakeOptions"):
        provisioner_class("not-a-provisioner")


def test_an_unknown_provisioner_names_the_built_in_and_installed_ones() -> None:
    with pytest.raises(UnknownProvisionerError) as caught:
        provisioner_class("nimbus")
    for known in ("local", "docker", "ec2", "fake"):
        assert known in str(caught.value)
