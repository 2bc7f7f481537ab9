"""The worker's boot script: it fetches the agent and its installer, pinned by sha256,
and runs the installer with the agent's environment.

A provisioner whose platform runs a script at first boot (EC2 user data, and the
like elsewhere: cloud-init, a VM's custom data) hands it :func:`render_user_data`'s
output. The script writes the agent environment (with the one-time bootstrap
token, never an access token), downloads the agent and its installer from the
service it will call back (``GET {WORKERLEASE_URL}/v1/agent/<name>``: the same
version as the service, and nothing to embed: with the task runner the agent no
longer fits EC2's 16 KB of user data even compressed), refuses any file whose
sha256 differs from the one written into the script, and runs the agent's own
installer (``images/agent/install.sh --service``, or ``install.ps1``, which always
registers and starts the agent's task). This is the single place that builds it;
size limits are the platform's and stay with its provisioner.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
import shlex
from collections.abc import Mapping

from provisioners.base import PermanentProvisionerError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_AGENT_FILES = {
    "linux": ("workerlease_agent.py", "install.sh"),
    "windows": ("workerlease_agent.py", "install.ps1"),
}


def agent_files(os_family: str) -> dict[str, bytes]:
    """The agent and its installer for ``os_family`` (``linux`` or ``windows``)."""
    root = importlib.resources.files("images.agent")
    files = {}
    for name in _AGENT_FILES[os_family]:
        try:
            files[name] = root.joinpath(name).read_bytes()
        except (FileNotFoundError, OSError) as exc:
            raise PermanentProvisionerError(
                f"agent file images/agent/{name} is missing from this installation"
            ) from exc
    return files


def render_user_data(
    env: Mapping[str, str],
    os_family: str,
    files: Mapping[str, bytes],
    extra: str = "",
) -> str:
    """The boot script: write ``files`` to a staging directory, run the installer.

    ``env`` is the agent environment (it holds the one-time bootstrap token and
    must never hold an access token). ``files`` must include the installer for
    ``os_family`` (``install.sh`` or ``install.ps1``); it is run from the staging
    directory with ``env`` in its environment and the instance's private IP as
    ``WORKERLEASE_AGENT_ADVERTISE_HOST``, read from IMDSv2. An empty ``files``
    renders only ``extra``.
    """
    for key, value in env.items():
        # install.sh / install.ps1 refuse quotes and newlines too; failing here names the key
        # instead of leaving an instance whose agent never calls back.
        if not _ENV_NAME.match(key) or "'" in value or "\n" in value or "\r" in value:
            raise PermanentProvisionerError(
                f"agent environment {key!r}: names are [A-Za-z_][A-Za-z0-9_]*, "
                "values may not contain quotes or newlines"
            )
    render = _render_powershell if os_family == "windows" else _render_shell
    return render(env, files, extra)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


AGENT_PATH = "/v1/agent/"  # where the service serves images/agent (service/api/ops.py)
FETCH_ATTEMPTS = 60  # the service may be restarting while a worker boots


def _render_shell(env: Mapping[str, str], files: Mapping[str, bytes], extra: str) -> str:
    lines = [
        "#!/bin/bash",
        "# workerlease worker bootstrap (provisioners.userdata.render_user_data)",
    ]
    if files:
        lines += [
            "set -euo pipefail",
            "umask 077",
            "stage=/run/workerlease-bootstrap",
            'mkdir -p "$stage" && cd "$stage"',
        ]
        lines += [f"export {key}={shlex.quote(value)}" for key, value in sorted(env.items())]
        lines += [
            "fetch() {  # fetch NAME SHA256: from the service, refused unless it matches",
            '  ca=""; [ -n "${WORKERLEASE_CA_FILE:-}" ] && ca="--cacert $WORKERLEASE_CA_FILE"',
            f"  for _ in $(seq {FETCH_ATTEMPTS}); do",
            f'    if curl -sf -m 30 $ca -o "$1" "${{WORKERLEASE_URL%/}}{AGENT_PATH}$1" &&',
            '       echo "$2  $1" | sha256sum -c --status -; then return 0; fi',
            "    sleep 5",
            "  done",
            '  echo "workerlease bootstrap: cannot fetch $1 from $WORKERLEASE_URL" >&2; exit 1',
            "}",
        ]
        lines += [f"fetch {shlex.quote(name)} {_sha256(data)}" for name, data in files.items()]
        lines += [
            "imds=http://169.254.169.254/latest",
            "tok=$(curl -sf -m 5 --retry 3 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300'"
            ' "$imds/api/token" || true)',
            'if [ -n "$tok" ]; then',
            "  WORKERLEASE_AGENT_ADVERTISE_HOST=$(curl -sf -m 5"
            ' -H "X-aws-ec2-metadata-token: $tok" "$imds/meta-data/local-ipv4" || true)',
            "  export WORKERLEASE_AGENT_ADVERTISE_HOST",
            "fi",
            "sh install.sh --service",
            'cd / && rm -rf "$stage"',
        ]
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


def _ps_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _render_powershell(env: Mapping[str, str], files: Mapping[str, bytes], extra: str) -> str:
    lines = [
        "<powershell>",
        "# workerlease worker bootstrap (provisioners.userdata.render_user_data)",
    ]
    if files:
        lines += [
            "$ErrorActionPreference = 'Stop'",
            "$stage = Join-Path $env:ProgramData 'workerlease-bootstrap'",
            "New-Item -ItemType Directory -Force -Path $stage | Out-Null",
        ]
        lines += [f"$env:{key} = {_ps_quote(value)}" for key, value in sorted(env.items())]
        lines += [
            "function Get-WorkerleaseFile([string]$Name, [string]$Sha256) {",
            "  $path = Join-Path $stage $Name",
            f"  $uri = $env:WORKERLEASE_URL.TrimEnd('/') + '{AGENT_PATH}' + $Name",
            f"  for ($i = 0; $i -lt {FETCH_ATTEMPTS}; $i++) {{",
            "    try {",
            "      Invoke-WebRequest -UseBasicParsing -TimeoutSec 30 -Uri $uri -OutFile $path",
            "      if ((Get-FileHash -Algorithm SHA256 $path).Hash -eq $Sha256) { return }",
            "    } catch { }",
            "    Start-Sleep -Seconds 5",
            "  }",
            '  throw "workerlease bootstrap: cannot fetch $Name from $env:WORKERLEASE_URL"',
            "}",
        ]
        lines += [
            f"Get-WorkerleaseFile {_ps_quote(name)} {_ps_quote(_sha256(data).upper())}"
            for name, data in files.items()
        ]
        lines += [
            "try {",
            "  $tok = Invoke-RestMethod -Method Put -TimeoutSec 5"
            " -Uri 'http://169.254.169.254/latest/api/token'"
            " -Headers @{'X-aws-ec2-metadata-token-ttl-seconds' = '300'}",
            "  $env:WORKERLEASE_AGENT_ADVERTISE_HOST = Invoke-RestMethod -TimeoutSec 5"
            " -Uri 'http://169.254.169.254/latest/meta-data/local-ipv4'"
            " -Headers @{'X-aws-ec2-metadata-token' = $tok}",
            "} catch { Write-Warning 'IMDSv2 unavailable: advertise host not set' }",
            "& powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass"
            " -File (Join-Path $stage 'install.ps1')",
            'if ($LASTEXITCODE -ne 0) { throw "install.ps1 failed: $LASTEXITCODE" }',
            "Remove-Item -Recurse -Force $stage",
        ]
    if extra:
        lines.append(extra)
    lines.append("</powershell>")
    return "\n".join(lines) + "\n"
