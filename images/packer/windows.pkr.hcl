# Windows Server worker AMI for workerlease EC2 pools.
#
# The image carries Python (the agent's only dependency) and the agent installed by
# images/agent/install.ps1 -NoStart, the one installer every target uses, with its
# scheduled task disabled. It holds no worker identity and no token: at boot, user
# data rendered by provisioners/userdata.py:render_user_data writes the worker's
# environment and runs the same install.ps1, which re-registers and starts the task.
#
#   packer init images/packer/windows.pkr.hcl
#   packer build -var region=eu-west-1 images/packer/windows.pkr.hcl

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
  default = "m7i.large"
}

variable "subnet_id" {
  type        = string
  default     = null
  description = "A subnet with outbound internet access (Python download); default: the default VPC."
}

variable "windows_ami_name" {
  type    = string
  default = "Windows_Server-2025-English-Full-Base-*"
}

variable "install_docker" {
  type        = bool
  default     = true
  description = "Install the Containers feature and Docker Engine (execution containers: Windows containers whose base image matches the host's build)."
}

variable "docker_version" {
  type        = string
  default     = "27.5.1"
  description = "Docker Engine static release from download.docker.com/win/static/stable/x86_64/."
}

variable "python_version" {
  type    = string
  default = "3.12.8"
}

variable "python_installer_sha256" {
  type        = string
  default     = ""
  description = "SHA-256 of python-<version>-amd64.exe; when set, the download is verified."
}

locals {
  stamp       = formatdate("YYYYMMDDhhmmss", timestamp())
  python_dir  = "C:\\Program Files\\Python${join("", slice(split(".", var.python_version), 0, 2))}"
  python_exe  = "${local.python_dir}\\python.exe"
  staging_dir = "C:\\Windows\\Temp\\workerlease-agent"
}

source "amazon-ebs" "windows" {
  region        = var.region
  instance_type = var.instance_type
  subnet_id     = var.subnet_id
  ami_name      = "workerlease-windows-${local.stamp}"
  # Only the machine running Packer may reach the build instance's WinRM port.
  temporary_security_group_source_public_ip = true

  source_ami_filter {
    filters = {
      name                = var.windows_ami_name
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = ["amazon"]
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
    volume_size           = 50
    volume_type           = "gp3"
    delete_on_termination = true
  }

  # Packer reads the Administrator password with GetPasswordData and talks WinRM over
  # HTTPS; this user data exists for the build instance only (the listener is not
  # reachable from workers: the worker security group admits the agent port alone).
  communicator   = "winrm"
  winrm_username = "Administrator"
  winrm_use_ssl  = true
  winrm_insecure = true
  winrm_timeout  = "20m"
  user_data      = <<-EOT
    <powershell>
    $ErrorActionPreference = 'Stop'
    $cert = New-SelfSignedCertificate -DnsName 'packer-build' -CertStoreLocation Cert:\LocalMachine\My
    New-Item -Path WSMan:\localhost\Listener -Transport HTTPS -Address * -CertificateThumbPrint $cert.Thumbprint -Force | Out-Null
    Set-Item -Path WSMan:\localhost\Service\Auth\Basic -Value $true
    New-NetFirewallRule -DisplayName 'WinRM HTTPS (packer build)' -Direction Inbound -Protocol TCP -LocalPort 5986 -Action Allow | Out-Null
    Restart-Service WinRM
    </powershell>
  EOT

  tags = {
    Name                = "workerlease-windows"
    "workerlease:image" = "windows"
  }
}

build {
  sources = ["source.amazon-ebs.windows"]

  provisioner "powershell" {
    environment_vars = [
      "PYTHON_VERSION=${var.python_version}",
      "PYTHON_SHA256=${var.python_installer_sha256}",
    ]
    inline = [
      "$ErrorActionPreference = 'Stop'",
      "$ProgressPreference = 'SilentlyContinue'",
      "$installer = Join-Path $env:TEMP 'python-installer.exe'",
      "Invoke-WebRequest -UseBasicParsing -Uri \"https://www.python.org/ftp/python/$env:PYTHON_VERSION/python-$env:PYTHON_VERSION-amd64.exe\" -OutFile $installer",
      "if ($env:PYTHON_SHA256 -and (Get-FileHash -Algorithm SHA256 $installer).Hash -ne $env:PYTHON_SHA256.ToUpperInvariant()) { throw 'Python installer checksum mismatch' }",
      "$p = Start-Process -FilePath $installer -ArgumentList '/quiet', 'InstallAllUsers=1', 'PrependPath=1', 'Include_test=0' -Wait -PassThru",
      "if ($p.ExitCode -ne 0) { throw \"Python installer exited with $($p.ExitCode)\" }",
      "Remove-Item $installer",
      "New-Item -ItemType Directory -Force -Path '${local.staging_dir}' | Out-Null",
    ]
  }

  # Execution containers: the Containers feature (a reboot), then Docker Engine's static
  # binaries registered as a service, as Microsoft documents for Windows Server. The agent
  # runs as SYSTEM, which may use the engine's named pipe. Windows runs Windows containers
  # only, of a base image matching the host's build (Server 2025: ltsc2025).
  # (`only` takes no variables: each step checks INSTALL_DOCKER; the reboot is harmless.)
  provisioner "powershell" {
    environment_vars = ["INSTALL_DOCKER=${var.install_docker}"]
    inline = [
      "if ($env:INSTALL_DOCKER -ne 'true') { exit 0 }",
      "Install-WindowsFeature -Name Containers | Out-Null",
    ]
  }

  provisioner "windows-restart" {}

  provisioner "powershell" {
    environment_vars = [
      "INSTALL_DOCKER=${var.install_docker}",
      "DOCKER_VERSION=${var.docker_version}",
    ]
    inline = [
      "if ($env:INSTALL_DOCKER -ne 'true') { exit 0 }",
      "$ErrorActionPreference = 'Stop'",
      "$ProgressPreference = 'SilentlyContinue'",
      "$zip = Join-Path $env:TEMP 'docker.zip'",
      "Invoke-WebRequest -UseBasicParsing -Uri \"https://download.docker.com/win/static/stable/x86_64/docker-$env:DOCKER_VERSION.zip\" -OutFile $zip",
      "Expand-Archive -Path $zip -DestinationPath $env:ProgramFiles -Force",
      "Remove-Item $zip",
      "[Environment]::SetEnvironmentVariable('Path', $env:Path + ';' + (Join-Path $env:ProgramFiles 'docker'), 'Machine')",
      "& (Join-Path $env:ProgramFiles 'docker\\dockerd.exe') --register-service",
      "Set-Service -Name docker -StartupType Automatic",
      "Start-Service docker",
      "& (Join-Path $env:ProgramFiles 'docker\\docker.exe') version",
    ]
  }

  # The agent and its installer, straight from images/agent (no copy kept here).
  provisioner "file" {
    sources = [
      "${path.root}/../agent/workerlease_agent.py",
      "${path.root}/../agent/install.ps1",
    ]
    destination = "${local.staging_dir}\\"
  }

  provisioner "powershell" {
    inline = [
      "$ErrorActionPreference = 'Stop'",
      "& '${local.staging_dir}\\install.ps1' -Python '${local.python_exe}' -NoStart",
      # The image starts no agent on its own: user data re-registers and starts the task.
      "Disable-ScheduledTask -TaskName 'workerlease-agent' | Out-Null",
      "Remove-Item -Force (Join-Path $env:ProgramData 'workerlease\\agent.env')",
      "Remove-Item -Recurse -Force '${local.staging_dir}'",
    ]
  }

  # Last: make EC2Launch v2 run its first-boot tasks, user data included, on every
  # instance launched from this image.
  provisioner "powershell" {
    inline = ["& 'C:\\Program Files\\Amazon\\EC2Launch\\ec2launch.exe' reset --clean"]
  }
}
