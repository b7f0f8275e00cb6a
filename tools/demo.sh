#!/usr/bin/env bash
# One-command local demo: installs what it needs (Debian 12, as root), starts RabbitMQ
# (or uses the running one), OpenBao, a one-node Ceph RGW and the cvmfs_server test
# double, runs the three daemons, provisions a repository, uploads files and a tarball,
# and shows them published.
#
# Usage:
#   tools/demo.sh                 run the scenario, print each step with timings, stop everything
#   tools/demo.sh --keep          leave the stack running; prints how to use it (CLI, upload)
#   tools/demo.sh --stop          stop the stack left by --keep
#   tools/demo.sh --workdir DIR   any of the above in DIR (default /tmp/cvmfs-publisher-demo);
#                                 one demo per directory, removed when it stops
#   tools/demo.sh --help          this text
set -euo pipefail
cd "$(dirname "$0")/.."
for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,/^set -e/{/^set -e/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
  esac
done
# --stop needs only the virtualenv the start made; a start makes sure everything is there
# (idempotent and quick once done).
if [[ " $* " != *" --stop "* ]]; then
  tools/setup-dev.sh
elif [ ! -x .venv/bin/python ]; then
  echo "no demo to stop: tools/demo.sh never ran in this checkout (no .venv)"
  exit 0
fi
exec .venv/bin/python -m devstack.demo "$@"
