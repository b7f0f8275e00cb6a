#!/usr/bin/env bash
# Prepare a Debian 12 machine for the test suite and the local demo:
# Debian packages, PostgreSQL, and a virtual environment .venv with the project and
# its test extras. RabbitMQ is only installed: the suite, the demo and the benchmarks
# start a node of their own (devstack/rabbitmq.py); a broker already
# running on this machine is left as it is (not started, stopped or given plugins).
# Idempotent: installs only what is missing. Run as root (apt, services).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup-dev] %s\n' "$*"; }

# --- Debian packages: the base list plus every .ci/apt-packages.* list
mapfile -t wanted < <(cat .ci/apt-packages .ci/apt-packages.* 2>/dev/null | sed 's/#.*//' | awk 'NF')
missing=()
for p in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# rabbitmq-server: the package only (the suite runs its own node). Its install would
# start the machine's broker as a service: a policy-rc.d keeps it from doing so,
# unless the machine already has a policy of its own.
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  log "apt-get install rabbitmq-server (not started as a service)"
  export DEBIAN_FRONTEND=noninteractive
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy"
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
  if [ -n "$policy" ]; then rm -f "$policy"; trap - EXIT; fi
fi

# --- PostgreSQL (the Zabbix server tests load its schema)
if command -v pg_ctlcluster >/dev/null && ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  log "starting PostgreSQL"
  for v in $(ls /etc/postgresql 2>/dev/null); do
    pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
  done
fi

# --- Python: the project and its test extras in .venv
# Installed once per pyproject.toml: the stamp names this checkout and the file's hash,
# so tools/demo.sh (which runs this script each time) does not reinstall on every start.
stamp=.venv/.setup-dev.stamp
want="$(pwd) $(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -x .venv/bin/cvmfs-publisher ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  log "ready (.venv already matches pyproject.toml)"
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
printf '%s\n' "$want" > "$stamp"
log "ready"
