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


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short forms (``!Ref x`` -> ``{"Ref": "x"}``)."""


def _short_form(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {"Ref" if suffix == "Ref" else f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _short_form)


def _load_template() -> dict[str, Any]:
    return yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader)  # a SafeLoader


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return _load_template()


def _arn(resource: str) -> dict[str, str]:
    """The ``!Sub`` ARN the template writes for ``resource`` (``subnet/${PrivateSubnetA}``)."""
    account = "" if resource.startswith("image/") else "${AWS::AccountId}"
    return {"Fn::Sub": f"arn:${{AWS::Partition}}:ec2:${{AWS::Region}}:{account}:{resource}"}


def _run_instances_statements(template: dict[str, Any]) -> list[dict[str, Any]]:
    document = template["Resources"]["ServicePolicy"]["Properties"]["PolicyDocument"]
    found = [s for s in document["Statement"] if "ec2:RunInstances" in _listed(s["Action"])]
    assert found and all(s["Effect"] == "Allow" for s in found)
    return found


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _granting(template: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """The RunInstances statements with a resource of ``kind`` (``image/``, ...)."""
    return [
        s
        for s in _run_instances_statements(template)
        if any(f":{kind}" in str(r) for r in _listed(s["Resource"]))
    ]


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


def test_run_instances_only_from_the_pool_images(template: dict[str, Any]) -> None:
    [statement] = _granting(template, "image/")

    assert _listed(statement["Resource"]) == [
        _arn("image/${UbuntuImageId}"),
        _arn("image/${WindowsImageId}"),
    ]


def test_run_instances_only_imdsv2_tagged_instances_of_the_allowed_types(
    template: dict[str, Any],
) -> None:
    [statement] = _granting(template, "instance/")

    assert _listed(statement["Resource"]) == [_arn("instance/*")]
    assert statement["Condition"] == {
        "StringEquals": {
            "aws:RequestTag/workerlease:deployment": {"Ref": "DeploymentId"},
            "ec2:MetadataHttpTokens": "required",
            "ec2:InstanceType": {"Ref": "WorkerInstanceTypes"},
        }
    }


def test_run_instances_network_interfaces_only_in_the_stacks_subnets(
    template: dict[str, Any],
) -> None:
    [statement] = _granting(template, "network-interface/")

    assert _listed(statement["Resource"]) == [_arn("network-interface/*")]
    assert statement["Condition"] == {
        "StringEquals": {
            "ec2:Subnet": [_arn("subnet/${PrivateSubnetA}"), _arn("subnet/${PrivateSubnetB}")]
        }
    }


def test_no_run_instances_statement_grants_a_wildcard_without_a_condition(
    template: dict[str, Any],
) -> None:
    for statement in _run_instances_statements(template):
        wildcards = [r for r in _listed(statement["Resource"]) if r["Fn::Sub"].endswith("/*")]
        unconditioned = [r for r in wildcards if "spot-instances-request/" not in r["Fn::Sub"]]
        # A spot request exists only inside the RunInstances call that the instance's own
        # conditions allow; every other wildcard needs a condition of its own.
        assert not unconditioned or statement.get("Condition"), statement["Sid"]


def test_example_pools_launch_what_the_policy_allows(template: dict[str, Any]) -> None:
    allowed = _allowed_instance_types()
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())

    for pool in config["pools"]:
        options = pool["options"]
        assert set(options["instance_types"]) <= set(allowed), pool["name"]
        # The image comes from the stack's launch template (its pool AMI), not image_id.
        assert "image_id" not in options and "launch_template" in options, pool["name"]
        assert options["subnet_ids"] == ["<PrivateSubnetAId>", "<PrivateSubnetBId>"]


def _ingress(template: dict[str, Any], group: str) -> list[dict[str, Any]]:
    """Every ingress rule of security group ``group``: inline ones and separate resources."""
    resources = template["Resources"]
    rules = list(resources[group]["Properties"].get("SecurityGroupIngress", []))
    rules += [
        r["Properties"]
        for r in resources.values()
        if r["Type"] == "AWS::EC2::SecurityGroupIngress"
        and r["Properties"]["GroupId"] == {"Ref": group}
    ]
    return rules


def test_tls_ends_at_an_https_load_balancer_in_front_of_the_service(
    template: dict[str, Any],
) -> None:
    resources = template["Resources"]
    balancer = resources["LoadBalancer"]["Properties"]
    [listener] = [
        r["Properties"]
        for r in resources.values()
        if r["Type"] == "AWS::ElasticLoadBalancingV2::Listener"
    ]
    target = resources["ServiceTargetGroup"]["Properties"]

    assert balancer["Type"] == "application" and balancer["Scheme"] == "internal"
    assert balancer["SecurityGroups"] == [{"Ref": "LoadBalancerSecurityGroup"}]
    assert (listener["Protocol"], listener["Port"]) == ("HTTPS", 443)  # the only listener
    assert listener["Certificates"] == [{"CertificateArn": {"Ref": "CertificateArn"}}]
    assert listener["SslPolicy"].startswith("ELBSecurityPolicy-TLS13-1-2")
    assert listener["DefaultActions"] == [
        {"Type": "forward", "TargetGroupArn": {"Ref": "ServiceTargetGroup"}}
    ]
    assert target["Port"] == {"Ref": "ServiceListenPort"}


def test_only_the_load_balancer_reaches_the_service_port(template: dict[str, Any]) -> None:
    [rule] = _ingress(template, "ServiceSecurityGroup")

    assert rule["SourceSecurityGroupId"] == {"Ref": "LoadBalancerSecurityGroup"}
    assert rule["FromPort"] == rule["ToPort"] == {"Ref": "ServiceListenPort"}


def test_workers_reach_the_service_through_the_load_balancer_only(
    template: dict[str, Any],
) -> None:
    from_workers = [
        r
        for r in _ingress(template, "LoadBalancerSecurityGroup")
        if r.get("SourceSecurityGroupId") == {"Ref": "WorkerSecurityGroup"}
    ]

    assert [(r["FromPort"], r["ToPort"]) for r in from_workers] == [(443, 443)]
    assert all(
        r.get("SourceSecurityGroupId") != {"Ref": "WorkerSecurityGroup"}
        for r in _ingress(template, "ServiceSecurityGroup")
    )


def test_metrics_are_not_served_through_the_load_balancer(template: dict[str, Any]) -> None:
    rules = [
        r["Properties"]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::ElasticLoadBalancingV2::ListenerRule"
    ]

    [hide] = [r for r in rules if "/metrics" in r["Conditions"][0]["PathPatternConfig"]["Values"]]
    assert hide["Actions"][0]["Type"] == "fixed-response"
    assert hide["Actions"][0]["FixedResponseConfig"]["StatusCode"] == "404"


@pytest.fixture(scope="module")
def stack(moto_endpoint: str, images: dict[str, str]) -> dict[str, str]:
    """The template deployed into moto; its outputs plus the deployment id."""
    import boto3

    cloudformation = boto3.client("cloudformation", region_name=REGION, endpoint_url=moto_endpoint)
    acm = boto3.client("acm", region_name=REGION, endpoint_url=moto_endpoint)
    s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto_endpoint)
    deployment_id = f"infra-{uuid.uuid4().hex[:8]}"
    name = f"workerlease-{deployment_id}"
    certificate = acm.request_certificate(DomainName="workerlease.internal.example.com")
    s3.create_bucket(Bucket=f"{name}-lb-logs")
    parameters = {
        "DeploymentId": deployment_id,
        "UbuntuImageId": images["ubuntu"],
        "WindowsImageId": images["windows"],
        "CertificateArn": certificate["CertificateArn"],
        "AccessLogBucket": f"{name}-lb-logs",
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


def _allowed_instance_types() -> list[str]:
    default = _load_template()["Parameters"]["WorkerInstanceTypes"]["Default"]
    return list(default.split(","))


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
        "default": "ec2",
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
    # What ServicePolicy's RunInstances conditions check, on the launched instance.
    assert found["MetadataOptions"]["HttpTokens"] == "required"
    assert found["InstanceType"] in options["instance_types"]
    assert found["InstanceType"] in _allowed_instance_types()
    assert {n["SubnetId"] for n in found["NetworkInterfaces"]} == {stack["PrivateSubnetAId"]}
    assert [h.worker_id for h in provisioner.list_owned(stack["DeploymentId"])] == [spec.worker_id]

    provisioner.destroy(handle)

    assert provisioner.describe([handle]) == {spec.worker_id: ResourceState.GONE}
    assert provisioner.list_owned(stack["DeploymentId"]) == []
