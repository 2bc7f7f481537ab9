"""The worker's boot script: the agent, its installer and its environment in one text.

A provisioner whose platform runs a script at first boot (EC2 user data, and the
like elsewhere: cloud-init, a VM's custom data) hands it :func:`render_user_data`'s
output. The script writes the agent environment (with the one-time bootstrap
token, never an access token), unpacks the agent embedded in it and runs the
agent's own installer (``images/agent/install.sh --service``, or ``install.ps1``,
which always registers and starts the agent's task). This is the single place that
builds it; size limits are the platform's and stay with its provisioner.
"""

from __future__ import annotations

import base64
import gzip
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


def _packed(data: bytes) -> str:
    # mtime=0 keeps the output stable, so identical specs give identical user data.
    return base64.b64encode(gzip.compress(data, compresslevel=9, mtime=0)).decode("ascii")


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
        for name, data in files.items():
            lines += [
                f"base64 -d <<'WL_EOF' | gunzip > {shlex.quote(name)}",
                _packed(data),
                "WL_EOF",
            ]
        lines += [f"export {key}={shlex.quote(value)}" for key, value in sorted(env.items())]
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
            "function Expand-WorkerleaseFile([string]$Packed, [string]$Name) {",
            "  $in = New-Object IO.MemoryStream(,[Convert]::FromBase64String($Packed))",
            "  $gz = New-Object IO.Compression.GZipStream($in, [IO.Compression.CompressionMode]::Decompress)",  # noqa: E501
            "  $out = [IO.File]::Create((Join-Path $stage $Name))",
            "  try { $gz.CopyTo($out) } finally { $out.Close(); $gz.Close() }",
            "}",
        ]
        lines += [
            f"Expand-WorkerleaseFile {_ps_quote(_packed(data))} {_ps_quote(name)}"
            for name, data in files.items()
        ]
        lines += [f"$env:{key} = {_ps_quote(value)}" for key, value in sorted(env.items())]
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
