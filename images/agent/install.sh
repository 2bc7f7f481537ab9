#!/bin/sh
# Install the workerlease agent on a POSIX machine (Dockerfile, EC2 user data, Packer).
#
#   WORKERLEASE_URL=... WORKERLEASE_WORKER_ID=... sh install.sh [--service]
#
# Copies workerlease_agent.py (from this script's directory) to /opt/workerlease/,
# writes every WORKERLEASE_* variable of the environment to /etc/workerlease/agent.env
# (mode 0600, KEY='value' lines, readable by systemd's EnvironmentFile= and by sh),
# and with --service installs, enables and starts workerlease-agent.service.
# For an https WORKERLEASE_URL signed by a private CA, put the CA bundle on the machine
# first and pass its path as WORKERLEASE_CA_FILE (written to agent.env like the rest);
# a CA in the system trust store (update-ca-certificates) needs nothing.
# Needs root and python3 (3.9+). DESTDIR, as usual, stages the files under another root.
set -eu

PREFIX=/opt/workerlease
CONF_DIR=/etc/workerlease
ENV_FILE=$CONF_DIR/agent.env
WORK_DIR=/var/lib/workerlease
UNIT=/etc/systemd/system/workerlease-agent.service
SRC_DIR=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)

die() { echo "install.sh: $*" >&2; exit 1; }

service=no
for arg in "$@"; do
    case $arg in
        --service) service=yes ;;
        *) die "unknown argument: $arg (usage: install.sh [--service])" ;;
    esac
done

[ -f "$SRC_DIR/workerlease_agent.py" ] || die "workerlease_agent.py not found next to install.sh"
PYTHON=$(command -v python3) || die "python3 not found"

D=${DESTDIR:-}
umask 022
mkdir -p "$D$PREFIX" "$D$CONF_DIR" "$D$WORK_DIR"
chmod 0755 "$D$PREFIX"
chmod 0700 "$D$CONF_DIR" "$D$WORK_DIR"
cp "$SRC_DIR/workerlease_agent.py" "$D$PREFIX/workerlease_agent.py.new"
chmod 0644 "$D$PREFIX/workerlease_agent.py.new"
mv -f "$D$PREFIX/workerlease_agent.py.new" "$D$PREFIX/workerlease_agent.py"

umask 077
# Names come from a strict pattern, so the eval below only ever reads a variable.
tmp=$D$ENV_FILE.new
value=
: >"$tmp"
for name in $(env | sed -n 's/^\(WORKERLEASE_[A-Z0-9_]*\)=.*/\1/p' | sort -u); do
    eval "value=\${$name-}"
    case $value in
        *"'"* | *'
'*) rm -f "$tmp"; die "$name contains a quote or a newline" ;;
    esac
    printf "%s='%s'\n" "$name" "$value" >>"$tmp"
done
chmod 0600 "$tmp"
mv -f "$tmp" "$D$ENV_FILE"
echo "install.sh: agent in $D$PREFIX, environment in $D$ENV_FILE"

[ "$service" = yes ] || exit 0
[ -z "$D" ] || die "--service cannot be used with DESTDIR"
[ -d /run/systemd/system ] || die "--service needs systemd as init (run $PREFIX/workerlease_agent.py yourself)"

cat >"$D$UNIT.new" <<EOF
[Unit]
Description=workerlease worker agent
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
EnvironmentFile=$ENV_FILE
WorkingDirectory=$WORK_DIR
ExecStart=$PYTHON $PREFIX/workerlease_agent.py
# The bootstrap token is one-time: a restarted agent would be refused, so no restart.
Restart=no
KillMode=control-group

[Install]
WantedBy=multi-user.target
EOF
chmod 0644 "$D$UNIT.new"
mv -f "$D$UNIT.new" "$D$UNIT"
systemctl daemon-reload
systemctl enable --now workerlease-agent.service
echo "install.sh: workerlease-agent.service started"
