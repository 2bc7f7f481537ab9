"""infra/aws: the CloudFormation template lints clean, deploys, and hosts real workers.

The template is checked by cfn-lint and checkov (both must pass; checks skipped in
the template carry their reason in the resource's Metadata), then deployed into
moto's CloudFormation and used by the EC2 provisioner exactly as config.example.yaml
uses it: launch templates for the image and security group, the stack's subnets.

moto gaps met here (the template is written for real AWS, the test works around
nothing but these): moto skips ``AWS::EC2::SecurityGroupEgress`` (with a warning;
the stack still completes) and does not apply a launch template's
``IamInstanceProfile`` or ``MetadataOptions`` to the instance. The provisioner
sends ``MetadataOptions`` itself, so IMDSv2 is still checked on the instance.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from provisioners.base import ResourceState
from provisioners.ec2 import TAG_DEPLOYMENT, TAG_WORKER

pytestmark = [pytest.mark.aws, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[3]
TEMPLATE = ROOT / "infra" / "aws" / "workerlease.yaml"
EXAMPLE_CONFIG = ROOT / "infra" / "aws" / "config.example.yaml"
REGION = "us-east-1"


def _tool(name: str) -> str:
    """A linter from this venv or PATH; ``WORKERLEASE_<NAME>`` may point elsewhere."""
    override = os.environ.get(f"WORKERLEASE_{name.upper().replace('-', '_')}")
    found = override or shutil.which(name, path=str(Path(sys.executable).parent))
    found = found or shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install cfn-lint checkov")
    return found


def test_template_passes_cfn_lint():
    result = subprocess.run(
        [_tool("cfn-lint"), str(TEMPLATE)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_template_passes_checkov():
    result = subprocess.run(
        [
            _tool("checkov"),
            "--file",
            str(TEMPLATE),
            "--framework",
            "cloudformation",
            "--skip-download",  # no network: use the bundled checks only
            "--output",
            "json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    report = json.loads(result.stdout)
    failed = report["results"].get("failed_checks", [])
    assert failed == [], [(c["check_id"], c["resource"]) for c in failed]
    assert report["summary"]["passed"] > 0
    for skipped in report["results"].get("skipped_checks", []):
        assert skipped.get("suppress_comment"), f"{skipped['check_id']} skipped without a reason"


@pytest.fixture(scope="module")
def stack(moto_endpoint: str, images: dict[str, str]) -> dict[str, str]:
    """The template deployed into moto; its outputs plus the deployment id."""
    import boto3

    cloudformation = boto3.client("cloudformation", region_name=REGION, endpoint_url=moto_endpoint)
    deployment_id = f"infra-{uuid.uuid4().hex[:8]}"
    name = f"workerlease-{deployment_id}"
    parameters = {
        "DeploymentId": deployment_id,
        "UbuntuImageId": images["ubuntu"],
        "WindowsImageId": images["windows"],
    }
    cloudformation.create_stack(
        StackName=name,
        TemplateBody=TEMPLATE.read_text(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
        Capabilities=["CAPABILITY_IAM"],
    )
    deadline = time.monotonic() + 180  # bounds a hang; moto is slow on a loaded machine
    while True:
        described = cloudformation.describe_stacks(StackName=name)["Stacks"][0]
        if not described["StackStatus"].endswith("IN_PROGRESS") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert described["StackStatus"] == "CREATE_COMPLETE", described.get("StackStatusReason")
    outputs = {o["OutputKey"]: o["OutputValue"] for o in described["Outputs"]}
    return {**outputs, "DeploymentId": deployment_id}


def _pool_options(pool: str, stack: dict[str, str]) -> dict[str, Any]:
    """The example config's options for ``pool``, with the stack's outputs filled in."""
    text = EXAMPLE_CONFIG.read_text()
    for key, value in stack.items():
        text = text.replace(f"<{key}>", value)
    config = yaml.safe_load(text)
    options = next(p for p in config["pools"] if p["name"] == pool)["options"]
    return dict(options)


def test_example_config_is_a_valid_service_config():
    from service.config import load_config
    from service.passes.provisioning import check_pool_options

    # Secrets come from the environment, as the example's header says.
    config = load_config(
        EXAMPLE_CONFIG,
        environ={"WORKERLEASE_ENCRYPTION_KEY": "k6LRXbUB0_aVtUzMKLnH2vGqY0JYDSGOIpu8zJOOBUA="},
    )

    check_pool_options(config)  # what serve does at start
    assert {p.name: p.provisioner for p in config.pools} == {
        "hosted-ubuntu": "ec2",
        "hosted-windows": "ec2",
    }


@pytest.mark.parametrize(
    ("pool", "os_name"), [("hosted-ubuntu", "ubuntu"), ("hosted-windows", "windows")]
)
def test_provisioner_runs_workers_on_the_deployed_stack(
    stack, pool, os_name, ec2, images, make_provisioner, make_spec
):
    options = _pool_options(pool, stack)
    # The stack lives in moto's us-east-1; spot placement is tested in test_ec2_provisioner.
    options.update(region=REGION, market="on-demand", image_id=None, security_group_ids=[])
    provisioner = make_provisioner(pool=pool, **options)
    spec = make_spec(pool=pool, os=os_name, deployment_id=stack["DeploymentId"])

    handle = provisioner.create(spec)

    found = ec2.describe_instances(InstanceIds=[handle.provider_id])["Reservations"][0][
        "Instances"
    ][0]
    tags = {t["Key"]: t["Value"] for t in found["Tags"]}
    assert tags[TAG_DEPLOYMENT] == stack["DeploymentId"] and tags[TAG_WORKER] == spec.worker_id
    assert found["SubnetId"] == stack["PrivateSubnetAId"]
    assert [g["GroupId"] for g in found["SecurityGroups"]] == [stack["WorkerSecurityGroupId"]]
    assert found["ImageId"] == images["ubuntu" if os_name == "ubuntu" else "windows"]
    assert found["MetadataOptions"]["HttpTokens"] == "required"
    assert [h.worker_id for h in provisioner.list_owned(stack["DeploymentId"])] == [spec.worker_id]

    provisioner.destroy(handle)

    assert provisioner.describe([handle]) == {spec.worker_id: ResourceState.GONE}
    assert provisioner.list_owned(stack["DeploymentId"]) == []
