# Ubuntu worker AMI for workerlease EC2 pools.
#
# The image carries python3, Docker Engine (Ubuntu's docker.io: the agent, run as root
# by systemd, runs execution containers with it), the agent (installed by
# images/agent/install.sh, the one installer every target uses) and whatever tooling
# var.extra_packages adds.
# It holds no worker identity and no token: at boot, user data rendered by
# provisioners/userdata.py:render_user_data writes the worker's environment and runs
# the same install.sh --service, which starts the agent.
#
#   packer init images/packer/ubuntu.pkr.hcl
#   packer build -var region=eu-west-1 images/packer/ubuntu.pkr.hcl

packer {
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.3.0"
    }
  }
}

variable "region" {
  type = string
}

variable "instance_type" {
  type    = string
  default = "t3.small"
}

variable "subnet_id" {
  type        = string
  default     = null
  description = "A subnet with outbound internet access (apt); default: the default VPC."
}

variable "ubuntu_release" {
  type        = string
  default     = "noble-24.04"
  description = "Canonical AMI name part, e.g. noble-24.04 or jammy-22.04."
}

variable "extra_packages" {
  type        = list(string)
  default     = []
  description = "Additional apt packages workers should have (git, build-essential, ...)."
}

locals {
  stamp = formatdate("YYYYMMDDhhmmss", timestamp())
}

source "amazon-ebs" "ubuntu" {
  region        = var.region
  instance_type = var.instance_type
  subnet_id     = var.subnet_id
  ssh_username  = "ubuntu"
  ami_name      = "workerlease-ubuntu-${var.ubuntu_release}-${local.stamp}"
  # Only the machine running Packer may reach the build instance's SSH port.
  temporary_security_group_source_public_ip = true

  source_ami_filter {
    filters = {
      name                = "ubuntu/images/hvm-ssd*/ubuntu-${var.ubuntu_release}-amd64-server-*"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = ["099720109477"] # Canonical
    most_recent = true
  }

  imds_support = "v2.0"
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  launch_block_device_mappings {
    device_name           = "/dev/sda1"
    volume_size           = 30
    volume_type           = "gp3"
    delete_on_termination = true
  }

  tags = {
    Name                = "workerlease-ubuntu-${var.ubuntu_release}"
    "workerlease:image" = "ubuntu"
  }
}

build {
  sources = ["source.amazon-ebs.ubuntu"]

  provisioner "shell" {
    inline = ["mkdir -p /tmp/workerlease-agent"]
  }

  # The agent and its installer, straight from images/agent (no copy kept here).
  provisioner "file" {
    sources = [
      "${path.root}/../agent/workerlease_agent.py",
      "${path.root}/../agent/install.sh",
    ]
    destination = "/tmp/workerlease-agent/"
  }

  provisioner "shell" {
    execute_command = "sudo env {{ .Vars }} sh -eux '{{ .Path }}'"
    environment_vars = [
      "DEBIAN_FRONTEND=noninteractive",
      "EXTRA_PACKAGES=${join(" ", var.extra_packages)}",
    ]
    inline = [
      "cloud-init status --wait || true",
      "apt-get update",
      "apt-get install -y --no-install-recommends python3 curl ca-certificates docker.io $EXTRA_PACKAGES",
      # Execution containers (docs/tasks.md): the engine starts at boot.
      "systemctl enable docker.service containerd.service",
      # Without --service and without WORKERLEASE_* variables: files only, no unit, no env.
      "sh /tmp/workerlease-agent/install.sh",
      "rm -f /etc/workerlease/agent.env",
      "rm -rf /tmp/workerlease-agent",
      "apt-get clean",
      # Instances from this AMI must run their own user data on first boot.
      "cloud-init clean --logs",
    ]
  }
}
