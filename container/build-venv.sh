#!/bin/sh
# Run by the builder stage of every image (RUN with this file bind-mounted;
# the working directory holds pyproject.toml, README.md and scripts/):
# a wheel of the project, installed into /opt/venv with the dependency set
# of the one daemon the image runs (the optional-dependency extra named after
# it in pyproject.toml), so that an image holds only what its daemon imports.
#   build-venv.sh DAEMON   DAEMON: the console script the image runs
#
# pip's index and CA bundle: PyPI with the system's CA certificates by
# default; a build on a host that reaches its package index through its own
# CA passes its pip configuration as the build secret "pip.conf" (mounted on
# /etc/pip.conf by the RUN, see container/build-images.sh), never as a layer.
set -eu

daemon=${1:?usage: build-venv.sh DAEMON}

python3 -m venv /opt/venv
/opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels .
set -- /wheels/*.whl
if [ "$#" -ne 1 ] || [ ! -f "$1" ]; then
    echo "build-venv.sh: expected one wheel in /wheels, got: $*" >&2
    exit 1
fi
/opt/venv/bin/pip install "${1}[${daemon}]"
/opt/venv/bin/python3 -c "import cvmfs_publisher.operations.health"
test -x "/opt/venv/bin/$daemon"
test -x /opt/venv/bin/cvmfs-publisher
# The daemon and the admin command line import with what was installed.
"/opt/venv/bin/$daemon" --help >/dev/null
/opt/venv/bin/cvmfs-publisher --help >/dev/null
