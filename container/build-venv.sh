#!/bin/sh
# Run by the builder stage of every image (RUN with this file bind-mounted;
# the working directory holds pyproject.toml, README.md and scripts/):
# a wheel of the project, installed with its dependencies into /opt/venv.
#   build-venv.sh DAEMON   DAEMON: the console script the image runs
set -eu

daemon=${1:?usage: build-venv.sh DAEMON}

python3 -m venv /opt/venv
/opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels .
/opt/venv/bin/pip install /wheels/*.whl
/opt/venv/bin/python3 -c "import cvmfs_publisher.operations.health"
test -x "/opt/venv/bin/$daemon"
test -x /opt/venv/bin/cvmfs-publisher
