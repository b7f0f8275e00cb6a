#!/bin/sh
# Run by the runtime stage of the two CVMFS images, publisher-consumer and
# sync-publisher (RUN with this file bind-mounted, as root), with the build
# arguments CVMFS_RELEASE_URL and CVMFS_VERSION in the environment. It
# installs CernVM-FS, the Zabbix agent and tini, takes systemctl away and
# makes the directories the containers use.
set -eu

: "${CVMFS_RELEASE_URL:?build argument CVMFS_RELEASE_URL is not set}"
: "${CVMFS_VERSION:?build argument CVMFS_VERSION is not set}"

# - policy-rc.d: package scripts must not start services (apache2, autofs and
#   zabbix-agent come as dependencies; nothing but the daemon and the agent
#   runs here, and Apache is not needed on a gateway-mode publisher).
# - CERN's apt repository, configured by its release package.
# - cvmfs + cvmfs-server (+ the fuse3 flavour) and what cvmfs_server runs
#   without systemd: attr (revision xattrs), psmisc/lsof (open file checks
#   before publish), rsync, tar, util-linux/mount (mount, findmnt, flock).
# - python3 runs the venv copied from the builder; tini is PID 1.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d
apt-get update
apt-get install -y --no-install-recommends ca-certificates curl
curl -fsSL --proto '=https' --tlsv1.2 -o /tmp/cvmfs-release.deb "${CVMFS_RELEASE_URL}"
apt-get install -y --no-install-recommends /tmp/cvmfs-release.deb
rm -f /tmp/cvmfs-release.deb
apt-get update
apt-get install -y --no-install-recommends \
    "cvmfs=${CVMFS_VERSION}" "cvmfs-server=${CVMFS_VERSION}" "cvmfs-fuse3=${CVMFS_VERSION}" \
    fuse3 attr psmisc lsof rsync tar gzip util-linux mount procps \
    python3 tini zabbix-agent
rm -rf /var/lib/apt/lists/*
dpkg-query -W cvmfs cvmfs-server cvmfs-fuse3 zabbix-agent tini

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
