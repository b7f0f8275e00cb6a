#!/bin/sh
# Builds the three images from the repository root, the way README.md
# ("Production deployment") and the container tests (tests/containers) do:
#   container/build-images.sh [options]
# Options (defaults in brackets):
#   --base IMAGE          Debian 12 base of every stage [the pinned tag of the Dockerfiles]
#   --tag TAG             image tag, as CVMFS_PUBLISHER_TAG in docker-compose.yml [local]
#   --cvmfs-server KIND   cernvm-fs (production) or test-double (tests only) [cernvm-fs]
#   --pip-conf FILE       pip configuration for the builder stage (index), a build secret
#   --ca-cert FILE        CA bundle pip must trust (named in --pip-conf as
#                         /run/secrets/ca.crt), a build secret
#   --network MODE        network of the RUN steps, e.g. host on a daemon without a bridge
#   --only IMAGE          build only this image (repeatable)
# Environment: DOCKER, the docker command [docker].
#
# Why a script and not `docker compose build`: the builds need BuildKit (RUN
# --mount, COPY --chmod) and build secrets, which docker-compose 1.29 cannot
# pass; and one place that knows the three image names and directories.
# Secrets never end up in a layer: BuildKit mounts them for the one RUN that
# installs the Python packages.
set -eu

docker=${DOCKER:-docker}
base=""
tag=local
cvmfs_server=cernvm-fs
pip_conf=""
ca_cert=""
network=""
only=""

usage() {
    sed -n '2,16p' "$0" >&2
    exit 2
}

while [ "$#" -gt 0 ]; do
    case $1 in
        --base) base=${2:?}; shift 2 ;;
        --tag) tag=${2:?}; shift 2 ;;
        --cvmfs-server) cvmfs_server=${2:?}; shift 2 ;;
        --pip-conf) pip_conf=${2:?}; shift 2 ;;
        --ca-cert) ca_cert=${2:?}; shift 2 ;;
        --network) network=${2:?}; shift 2 ;;
        --only) only="$only ${2:?}"; shift 2 ;;
        -h | --help) usage ;;
        *) echo "build-images.sh: unknown option $1" >&2; usage ;;
    esac
done

case $cvmfs_server in
    cernvm-fs | test-double) ;;
    *) echo "build-images.sh: --cvmfs-server $cvmfs_server: expected cernvm-fs or test-double" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."

# image:directory; the CVMFS images take CVMFS_SERVER.
for entry in publisher-consumer:publisher-consumer cvmfs-repo-consumers:cvmfs-repo-consumers \
             sync-publisher:sync-publisher; do
    image=${entry%%:*}
    directory=${entry#*:}
    if [ -n "$only" ]; then
        case " $only " in *" $image "*) ;; *) continue ;; esac
    fi
    set -- build --file "$directory/Dockerfile" --tag "$image:$tag"
    [ -z "$base" ] || set -- "$@" --build-arg "BASE_IMAGE=$base"
    [ "$image" = cvmfs-repo-consumers ] || set -- "$@" --build-arg "CVMFS_SERVER=$cvmfs_server"
    [ -z "$pip_conf" ] || set -- "$@" --secret "id=pip.conf,src=$pip_conf"
    [ -z "$ca_cert" ] || set -- "$@" --secret "id=ca.crt,src=$ca_cert"
    [ -z "$network" ] || set -- "$@" --network "$network"
    echo "build-images.sh: $image:$tag (base ${base:-from the Dockerfile}, cvmfs_server $cvmfs_server)" >&2
    DOCKER_BUILDKIT=1 "$docker" "$@" .
done
