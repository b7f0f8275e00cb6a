#!/bin/sh
# Entrypoint of the two CVMFS images, publisher-consumer and sync-publisher;
# tini (PID 1) runs it. The image names its daemon in ENTRYPOINT_DAEMON
# (publisher-consumer or cvmfs-repo-sync, see the Dockerfiles).
#
# Why a script: cvmfs_server fails late and obscurely when the host does not
# give it what it needs (/dev/fuse, a spool that is not itself on OverlayFS,
# no systemd). This checks those first and stops with one line that says
# what to fix; then it starts the Zabbix agent in the background and replaces
# itself (exec) with the daemon, so that the SIGTERM tini forwards on
# `docker stop` reaches the daemon itself, which finishes what it is doing
# before it exits: publisher-consumer the provisioning step in progress (or
# leaves its message unacknowledged), cvmfs-repo-sync its transaction
# (finished or aborted).
set -eu

DAEMON=${ENTRYPOINT_DAEMON:-cvmfs-entrypoint}
CONFIG=${CVMFS_PUBLISHER_CONFIG:-/etc/cvmfs-publisher/publisher.yaml}
SPOOL=/var/spool/cvmfs
KEYS_SHARED=/etc/cvmfs/keys-shared
AGENT_CONF=/etc/zabbix/zabbix_agentd.container.conf
AGENT_RUNTIME_CONF=/etc/zabbix/zabbix_agentd.runtime.conf
AGENT_RUN_DIR=/run/zabbix

# shellcheck source-path=SCRIPTDIR source=lib.sh
. /usr/local/lib/cvmfs-publisher/lib.sh

check_cvmfs_host() {
    # Upstream cvmfs_server decides "systemd or not" by the existence of
    # /bin/systemctl; with it, mounts go through systemctl and fail here.
    for p in /bin/systemctl /usr/bin/systemctl; do
        [ ! -e "$p" ] || die "$p exists but systemd does not run in this container: cvmfs_server would mount through it; rebuild the image (it diverts systemctl away)"
    done
    [ -c /dev/fuse ] || die "/dev/fuse is missing: run this container privileged with devices: [/dev/fuse]"
    grep -qw overlay /proc/filesystems ||
        log "WARNING: the kernel lists no overlay file system yet; cvmfs_server needs OverlayFS (modprobe overlay on the host)"

    [ -d "$SPOOL" ] || die "$SPOOL is missing: bind-mount an ext4 or xfs host directory there"
    fstype=$(stat -f -c %T "$SPOOL")
    case $fstype in
        overlayfs)
            die "$SPOOL is on OverlayFS (the container's own file system?): bind-mount an ext4 or xfs host directory there; OverlayFS on OverlayFS fails" ;;
        ext2/ext3 | xfs) ;;
        *) log "WARNING: $SPOOL is on $fstype; cvmfs_server is tested on ext4 and xfs (ftype=1)" ;;
    esac

    # Repository mounts made by one CVMFS container must reach the other one
    # (publisher-consumer runs mkfs, sync-publisher publishes): the compose
    # file binds /cvmfs and the spool with rshared propagation.
    for d in /cvmfs "$SPOOL"; do
        prop=$(findmnt -n -o PROPAGATION --target "$d" 2>/dev/null || true)
        case $prop in
            shared*) ;;
            *) log "WARNING: $d is not a shared mount (propagation: ${prop:-unknown}); mounts made in the other CVMFS container stay invisible here, and this container mounts its own" ;;
        esac
    done

    # Root-only keys volume (DESIGN §4): whatever the volume was created with.
    mkdir -p "$KEYS_SHARED"
    chown root:root "$KEYS_SHARED"
    chmod 0700 "$KEYS_SHARED"
}

[ -n "${ENTRYPOINT_DAEMON:-}" ] ||
    die "ENTRYPOINT_DAEMON is not set: the image's Dockerfile names the daemon this container runs"

umask 022
[ "$#" -gt 0 ] || set -- "$DAEMON" --config "$CONFIG"

# The test variant of the image (CVMFS_SERVER=test-double, see install-cvmfs.sh).
if [ -e /usr/share/cvmfs-publisher/cvmfs-server-is-a-test-double ]; then
    log "WARNING: TEST IMAGE: cvmfs_server is the project's test double (tests/cvmfs_server_double.py), not CernVM-FS; it publishes nothing to a stratum 0: never run this image in production (rebuild with CVMFS_SERVER=cernvm-fs)"
fi
check_cvmfs_host
mkdir -p /var/log/publisher /var/lib/cvmfs-publisher
case $DAEMON in
    cvmfs-repo-sync)
        # It publishes what cvmfs-repo-consumers stages: nothing to do without it.
        [ -d /data/cvmfs ] || die "/data/cvmfs is missing: mount the staging volume shared with cvmfs-repo-consumers" ;;
esac

run_daemon "$@"
