#!/bin/sh
# Run by the runtime stage of the two CVMFS images, publisher-consumer and
# sync-publisher (RUN with this file and the cvmfs_server test double
# bind-mounted, as root), with the build arguments CVMFS_SERVER,
# CVMFS_RELEASE_URL and CVMFS_VERSION in the environment. It installs
# CernVM-FS (or, for the tests only, the project's cvmfs_server test double),
# the Zabbix agent and tini, takes systemctl away and makes the directories
# the containers use.
#
# CVMFS_SERVER:
#   cernvm-fs    (production) CERN's cvmfs and cvmfs-server packages.
#   test-double  tests/cvmfs_server_double.py as /usr/bin/cvmfs_server, for
#                the container tests on machines that cannot reach CERN's
#                repository. Never for production: it publishes nothing to a
#                stratum 0. The image says so in its label
#                org.cvmfs-publisher.cvmfs-server and the entrypoint logs a
#                warning at every start (marker file below).
set -eu

: "${CVMFS_SERVER:?build argument CVMFS_SERVER is not set}"
DOUBLE_SOURCE=${DOUBLE_SOURCE:-/tmp/cvmfs_server_double.py}
DOUBLE_MARKER=/usr/share/cvmfs-publisher/cvmfs-server-is-a-test-double

# - policy-rc.d: package scripts must not start services (apache2, autofs and
#   zabbix-agent come as dependencies; nothing but the daemon and the agent
#   runs here, and Apache is not needed on a gateway-mode publisher).
# - what cvmfs_server runs without systemd: attr (revision xattrs),
#   psmisc/lsof (open file checks before publish), rsync, tar,
#   util-linux/mount (mount, findmnt, flock); fuse3 for the client.
# - python3 runs the venv copied from the builder; tini is PID 1.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d
apt-get update
common="fuse3 attr psmisc lsof rsync tar gzip util-linux mount procps python3 tini zabbix-agent"
case $CVMFS_SERVER in
    cernvm-fs)
        : "${CVMFS_RELEASE_URL:?build argument CVMFS_RELEASE_URL is not set}"
        : "${CVMFS_VERSION:?build argument CVMFS_VERSION is not set}"
        # CERN's apt repository, configured by its release package.
        apt-get install -y --no-install-recommends ca-certificates curl
        curl -fsSL --proto '=https' --tlsv1.2 -o /tmp/cvmfs-release.deb "${CVMFS_RELEASE_URL}"
        apt-get install -y --no-install-recommends /tmp/cvmfs-release.deb
        rm -f /tmp/cvmfs-release.deb
        apt-get update
        # shellcheck disable=SC2086 # $common is a list of package names
        apt-get install -y --no-install-recommends \
            "cvmfs=${CVMFS_VERSION}" "cvmfs-server=${CVMFS_VERSION}" "cvmfs-fuse3=${CVMFS_VERSION}" \
            $common
        dpkg-query -W cvmfs cvmfs-server cvmfs-fuse3
        ;;
    test-double)
        # shellcheck disable=SC2086 # $common is a list of package names
        apt-get install -y --no-install-recommends $common
        install -d -m 0755 /usr/local/lib/cvmfs-publisher /usr/share/cvmfs-publisher
        install -m 0755 "$DOUBLE_SOURCE" /usr/local/lib/cvmfs-publisher/cvmfs_server_double.py
        # The double maps every real path under CVMFS_DOUBLE_ROOT: here / itself,
        # so that it uses the very directories (and volumes) cvmfs_server would.
        printf '#!/bin/sh\n# TEST DOUBLE of cvmfs_server (tests/cvmfs_server_double.py); not CernVM-FS.\nCVMFS_DOUBLE_ROOT=/ exec /usr/bin/python3 /usr/local/lib/cvmfs-publisher/cvmfs_server_double.py "$@"\n' \
            > /usr/bin/cvmfs_server
        chmod 0755 /usr/bin/cvmfs_server
        echo "cvmfs_server is tests/cvmfs_server_double.py: a test image, never for production" \
            > "$DOUBLE_MARKER"
        ;;
    *)
        echo "install-cvmfs.sh: CVMFS_SERVER=$CVMFS_SERVER: expected cernvm-fs (production) or test-double (tests)" >&2
        exit 2 ;;
esac
rm -rf /var/lib/apt/lists/*
dpkg-query -W zabbix-agent tini python3

# Upstream cvmfs_server decides "systemd or not" by the existence of
# /bin/systemctl. Systemd is not PID 1 here, so mounts must go through
# /etc/fstab and plain mount(8): divert systemctl away if any package brought
# it (a diversion also survives later upgrades), and fail the build if it is
# still there.
for p in /bin/systemctl /usr/bin/systemctl; do
    if [ -e "$p" ]; then dpkg-divert --local --rename --divert "$p.container-disabled" --add "$p"; fi
done
test ! -e /bin/systemctl
test ! -e /usr/bin/systemctl

# Mount points and directories. The keys directory, where publisher-consumer
# writes the keys it reads from Vault, is root-only (DESIGN §4). /data/cvmfs
# (the staging volume: sync-publisher applies and cleans it up,
# deprovisioning removes a repository's directory) belongs to the consumers'
# user (10001), because whichever container first mounts the shared staging
# volume gives it this ownership.
install -d -m 0700 -o root -g root /etc/cvmfs/keys-shared
install -d -m 0755 /etc/cvmfs/repositories.d /etc/cvmfs/keys /etc/cvmfs-publisher \
    /cvmfs /srv/cvmfs /var/spool/cvmfs /var/log/publisher /var/lib/cvmfs-publisher
install -d -m 0755 -o 10001 -g 10001 /data/cvmfs
install -d -m 0755 -o zabbix -g zabbix /run/zabbix
