#!/usr/bin/env bash
# Prepare a Debian 12 machine for the test suite and the local demo:
# Debian packages, the machine's services (RabbitMQ with management, PostgreSQL),
# and a virtual environment .venv with the project and its test extras.
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
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && ! command -v rabbitmq-server >/dev/null; then
  missing+=(rabbitmq-server)
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- RabbitMQ on loopback (the machine's, or Debian's started here)
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  log "starting rabbitmq-server on 127.0.0.1"
  export RABBITMQ_NODENAME=rabbit@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  rabbitmq-server -detached
  for _ in $(seq 1 120); do rabbitmqctl -q await_startup >/dev/null 2>&1 && break; sleep 0.5; done
  rabbitmqctl -q await_startup
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/15672) 2>/dev/null; then
  log "enabling the RabbitMQ management plugin"
  rabbitmq-plugins enable rabbitmq_management >/dev/null
  for _ in $(seq 1 60); do (exec 3<>/dev/tcp/127.0.0.1/15672) 2>/dev/null && break; sleep 0.5; done
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
