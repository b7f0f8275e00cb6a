#!/usr/bin/env bash
# One-command local demo: installs what it needs (Debian 12, as root), starts RabbitMQ,
# OpenBao, a one-node Ceph RGW and the cvmfs_server test double, runs the three daemons,
# provisions a repository, uploads files and a tarball, and shows them published.
#   tools/demo.sh [--keep] | tools/demo.sh --stop
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--stop" ]; then
  tools/setup-dev.sh
fi
exec .venv/bin/python -m devstack.demo "$@"
