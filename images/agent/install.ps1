<#
.SYNOPSIS
Install the workerlease agent on Windows (EC2 user data, Packer templates).

.DESCRIPTION
Copies workerlease_agent.py from this script's folder to C:\ProgramData\workerlease
(readable by SYSTEM and Administrators only), writes the WORKERLEASE_* variables of
the current environment to agent.env there (KEY='value' lines, as install.sh does),
writes run-agent.ps1 which loads agent.env and runs the agent, registers the
scheduled task "workerlease-agent" (at startup, as SYSTEM) and starts it.
The agent logs to agent.log; scripts run in the work folder.
For an https WORKERLEASE_URL signed by a private CA, put the CA bundle (PEM) on the
machine first and pass its path as WORKERLEASE_CA_FILE (written to agent.env like the
rest); Python on Windows also trusts the machine's certificate store.

.PARAMETER Python
Full path of python.exe (3.9+). Default: the python.exe found on PATH now
(SYSTEM's PATH may differ, so the full path is stored).

.PARAMETER NoStart
Register the task without starting it (image builds: it starts at next boot).
#>
[CmdletBinding()]
param(
    [string]$Python = '',
    [switch]$NoStart
)
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

$Root = Join-Path $env:ProgramData 'workerlease'
$WorkDir = Join-Path $Root 'work'
$EnvFile = Join-Path $Root 'agent.env'
$Launcher = Join-Path $Root 'run-agent.ps1'
$TaskName = 'workerlease-agent'

$AgentSource = Join-Path $PSScriptRoot 'workerlease_agent.py'
if (-not (Test-Path -LiteralPath $AgentSource)) { throw "workerlease_agent.py not found next to install.ps1" }
if (-not $Python) {
    $found = Get-Command python.exe -CommandType Application -ErrorAction SilentlyContinue | Select-Object -First 1
    if (-not $found) { throw 'python.exe not found on PATH; pass -Python C:\path\to\python.exe' }
    $Python = $found.Source
}

New-Item -ItemType Directory -Force -Path $Root, $WorkDir | Out-Null
# Only SYSTEM (S-1-5-18) and Administrators (S-1-5-32-544): agent.env holds the bootstrap token.
& icacls.exe $Root /inheritance:r /grant:r '*S-1-5-18:(OI)(CI)F' '*S-1-5-32-544:(OI)(CI)F' | Out-Null
if ($LASTEXITCODE -ne 0) { throw "icacls failed on $Root" }

Copy-Item -LiteralPath $AgentSource -Destination (Join-Path $Root 'workerlease_agent.py') -Force

[string[]]$lines = @(
    Get-ChildItem Env: | Where-Object { $_.Name -match '^WORKERLEASE_[A-Z0-9_]+$' } | Sort-Object Name | ForEach-Object {
        if ($_.Value -match "['`r`n]") { throw "$($_.Name) contains a quote or a newline" }
        "$($_.Name.ToUpperInvariant())='$($_.Value)'"
    }
)
Set-Content -LiteralPath $EnvFile -Value $lines -Encoding UTF8

$launcherText = @'
# Written by install.ps1: load agent.env into this process, run the agent, pass its exit code on.
$ErrorActionPreference = 'Stop'
foreach ($line in Get-Content -LiteralPath (Join-Path $PSScriptRoot 'agent.env') -Encoding UTF8) {
    if ($line -match "^([A-Z0-9_]+)='(.*)'$") {
        [Environment]::SetEnvironmentVariable($Matches[1], $Matches[2], 'Process')
    }
}
$agent = Join-Path $PSScriptRoot 'workerlease_agent.py'
$proc = Start-Process -FilePath '__PYTHON__' -ArgumentList ('"' + $agent + '"') `
    -WorkingDirectory (Join-Path $PSScriptRoot 'work') -NoNewWindow -Wait -PassThru `
    -RedirectStandardError (Join-Path $PSScriptRoot 'agent.log') `
    -RedirectStandardOutput (Join-Path $PSScriptRoot 'agent.out.log')
exit $proc.ExitCode
'@
Set-Content -LiteralPath $Launcher -Value $launcherText.Replace('__PYTHON__', $Python.Replace("'", "''")) -Encoding UTF8

if (Get-ScheduledTask -TaskName $TaskName -ErrorAction SilentlyContinue) {
    Stop-ScheduledTask -TaskName $TaskName -ErrorAction SilentlyContinue
}
$action = New-ScheduledTaskAction -Execute 'powershell.exe' -WorkingDirectory $WorkDir `
    -Argument ('-NoProfile -NonInteractive -ExecutionPolicy Bypass -File "{0}"' -f $Launcher)
$trigger = New-ScheduledTaskTrigger -AtStartup
$principal = New-ScheduledTaskPrincipal -UserId 'SYSTEM' -LogonType ServiceAccount -RunLevel Highest
# No time limit; one instance. No restart: the bootstrap token is one-time.
$settings = New-ScheduledTaskSettingsSet -ExecutionTimeLimit ([TimeSpan]::Zero) -MultipleInstances IgnoreNew `
    -AllowStartIfOnBatteries -DontStopIfGoingOnBatteries
Register-ScheduledTask -TaskName $TaskName -Action $action -Trigger $trigger -Principal $principal `
    -Settings $settings -Force | Out-Null

if (-not $NoStart) {
    Start-ScheduledTask -TaskName $TaskName
    Write-Output "install.ps1: task $TaskName started; agent in $Root"
} else {
    Write-Output "install.ps1: task $TaskName registered; agent in $Root"
}
