"""What an EC2 pool may configure (``EC2Options``), and the tag keys it may not."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from provisioners.base import ProvisionerOptions

# Ownership tags: EC2 tag keys conventionally use ":" where other platforms use ".".
TAG_DEPLOYMENT = "workerlease:deployment"
TAG_POOL = "workerlease:pool"
TAG_WORKER = "workerlease:worker"
TAG_INSTALLATION = "workerlease:installation"
RESERVED_TAG_PREFIXES = ("workerlease:", "aws:")

DEFAULT_AGENT_PORT = 8750


class LaunchTemplateRef(BaseModel):
    """A launch template by id or by name, and the version to launch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = None
    name: str | None = None
    version: str = "$Default"

    @model_validator(mode="after")
    def _one_reference(self) -> LaunchTemplateRef:
        if (self.id is None) == (self.name is None):
            raise ValueError("give exactly one of 'id' or 'name'")
        return self

    def as_param(self) -> dict[str, str]:
        key = "LaunchTemplateId" if self.id else "LaunchTemplateName"
        return {key: self.id or self.name or "", "Version": self.version}


class EC2Options(ProvisionerOptions):
    """A pool's ``options`` for ``provisioner: ec2``."""

    region: str
    endpoint_url: str | None = None  # AWS_ENDPOINT_URL_EC2 works too (botocore)
    # The image: image_id, or a launch template that names one (image_id then overrides it).
    image_id: str | None = None
    launch_template: LaunchTemplateRef | None = None
    # Tried in order; empty means "whatever the launch template says".
    instance_types: tuple[str, ...] = ()
    subnet_ids: tuple[str, ...] = ()
    security_group_ids: tuple[str, ...] = ()
    iam_instance_profile: str | None = None  # name or ARN
    key_name: str | None = None
    root_volume_gb: int | None = Field(default=None, ge=1, le=16384)
    root_device_name: str = "/dev/sda1"  # Ubuntu and Windows AMIs; Amazon Linux uses /dev/xvda
    market: Literal["on-demand", "spot", "spot-then-on-demand"] = "on-demand"
    user_data_extra: str = ""  # appended to the boot script (shell or PowerShell)
    # Extra agent settings, e.g. WORKERLEASE_CA_FILE for a service behind a private CA.
    agent_env: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    # "running": the image has no agent; the worker is ready once the instance runs.
    ready_when: Literal["agent", "running"] = "agent"
    os: Literal["linux", "windows"] | None = None  # default: from the pool's os
    agent_port: int = Field(default=DEFAULT_AGENT_PORT, ge=1, le=65535)
    max_attempts: int = Field(default=5, ge=1, le=20)  # botocore adaptive retries per call
    throttle_max_wait_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> EC2Options:
        if self.image_id is None and self.launch_template is None:
            raise ValueError("give image_id, launch_template, or both")
        if self.launch_template is None and not self.instance_types:
            raise ValueError("instance_types is required without a launch_template")
        reserved = [k for k in self.tags if k.startswith(RESERVED_TAG_PREFIXES)]
        if reserved:
            raise ValueError(f"tags may not use reserved keys: {', '.join(sorted(reserved))}")
        return self
