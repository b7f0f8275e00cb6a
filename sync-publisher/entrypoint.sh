#!/bin/sh
# Entrypoint of the sync-publisher image; tini (PID 1) runs it.
#
# Why a script: cvmfs_server fails late and obscurely when the host does not
# give it what it needs (/dev/fuse, a spool that is not itself on OverlayFS,
# no systemd). This checks those first and stops with one line that says
# what to fix; then it starts the Zabbix agent in the background and replaces
# itself (exec) with the daemon, so that the SIGTERM tini forwards on
# `docker stop` reaches the daemon itself, which finishes or aborts its
# transaction before it exits.
set -eu

DAEMON=cvmfs-repo-sync
CONFIG=${CVMFS_PUBLISHER_CONFIG:-/etc/cvmfs-publisher/publisher.yaml}
SPOOL=/var/spool/cvmfs
KEYS_SHARED=/etc/cvmfs/keys-shared
AGENT_CONF=/etc/zabbix/zabbix_agentd.container.conf
AGENT_RUNTIME_CONF=/etc/zabbix/zabbix_agentd.runtime.conf

log() {
    printf '%s %s entrypoint: %s\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" "$DAEMON" "$*" >&2
}

die() {
    log "FATAL: $*"
    exit 78 # EX_CONFIG: the host or the compose file must change, not the code
}

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
    # (publisher-consumer runs mkfs, this container publishes): the compose
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

# One value for the agent's configuration file, refused when it could smuggle
# in another parameter (a newline) or is not a host/address list.
agent_value() {
    name=$1
    value=$2
    nl='
'
    case $value in
        *"$nl"*) die "$name must be a single line" ;;
    esac
    printf '%s' "$value" | grep -Eq '^[][A-Za-z0-9.,:/_-]+$' ||
        die "$name=$value: expected host names or addresses separated by commas"
    printf '%s' "$value"
}

start_zabbix_agent() {
    if [ "${ZBX_AGENT_ENABLED:-1}" != 1 ]; then
        log "Zabbix agent disabled (ZBX_AGENT_ENABLED=${ZBX_AGENT_ENABLED:-})"
        return 0
    fi
    # Validated into variables first: a failure inside $(...) must stop us.
    server=$(agent_value ZBX_SERVER "${ZBX_SERVER:-127.0.0.1}")
    active=""
    if [ -n "${ZBX_SERVER_ACTIVE:-}" ]; then
        active=$(agent_value ZBX_SERVER_ACTIVE "$ZBX_SERVER_ACTIVE")
    fi
    host=""
    if [ -n "${ZBX_HOSTNAME:-}" ]; then
        host=$(agent_value ZBX_HOSTNAME "$ZBX_HOSTNAME")
    fi
    {
        printf '# Written by entrypoint.sh at container start from the ZBX_* environment.\n'
        printf 'Server=%s\n' "$server"
        [ -z "$active" ] || printf 'ServerActive=%s\n' "$active"
        [ -z "$host" ] || printf 'Hostname=%s\n' "$host"
    } >"$AGENT_RUNTIME_CONF.tmp"
    mv "$AGENT_RUNTIME_CONF.tmp" "$AGENT_RUNTIME_CONF"
    # The agent drops to user zabbix (it only reads the status documents).
    install -d -o zabbix -g zabbix -m 0755 /run/zabbix
    zabbix_agentd --foreground -c "$AGENT_CONF" &
    log "Zabbix agent started (pid $!)"
}

umask 022
[ "$#" -gt 0 ] || set -- "$DAEMON" --config "$CONFIG"

check_cvmfs_host
mkdir -p /var/log/publisher /var/lib/cvmfs-publisher
[ -d /data/cvmfs ] || die "/data/cvmfs is missing: mount the staging volume shared with cvmfs-repo-consumers"

# The agent runs next to the daemon only: a one-off command
# (`docker compose run --rm sync-publisher cvmfs-publisher status`) gets none.
if [ "$1" = "$DAEMON" ]; then
    start_zabbix_agent
fi

log "starting: $*"
exec "$@"
