#!/bin/sh
# A Debian 12 (bookworm) base image made locally, for hosts that cannot pull
# the pinned Docker Hub tag of the Dockerfiles (the container tests, an
# air-gapped publisher host): debootstrap's minimal variant from a Debian
# mirror, imported into Docker under NAME.
#   container/make-base-image.sh NAME MIRROR [WORKDIR]
#     NAME     image name, e.g. cvmfs-publisher-base:bookworm (then
#              container/build-images.sh --base NAME)
#     MIRROR   a Debian mirror URL, e.g. the host's own from /etc/apt/sources.list*
#     WORKDIR  where the root file system is made (a temporary directory)
# Environment: DOCKER, the docker command [docker]. Run as root (debootstrap).
set -eu

name=${1:?usage: make-base-image.sh NAME MIRROR [WORKDIR]}
mirror=${2:?usage: make-base-image.sh NAME MIRROR [WORKDIR]}
docker=${DOCKER:-docker}
work=${3:-$(mktemp -d)}
rootfs=$work/rootfs

rm -rf "$rootfs"
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >&2
# Like Debian's -slim images: no documentation, manual pages or translations,
# now and in every package installed later (dpkg path-exclude; copyright
# files stay).
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/cvmfs-publisher-slim" <<'EXCLUDES'
# container/make-base-image.sh: as Debian's -slim images
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EXCLUDES
find "$rootfs/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$rootfs"/usr/share/info/* "$rootfs"/usr/share/lintian/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/usr/share/man/*
# No package lists or caches in the image; apt-get update comes first in every build.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/cache/apt/*.bin
tar -C "$rootfs" -c . | "$docker" import --change 'CMD ["/bin/bash"]' - "$name"
rm -rf "$rootfs"
