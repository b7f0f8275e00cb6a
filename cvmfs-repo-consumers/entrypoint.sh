#!/bin/sh
# Entrypoint of the cvmfs-repo-consumers image; tini (PID 1) runs it.
#
# Why a script: this container runs as an unprivileged user (10001) with a
# read-only root file system, so a host directory or secret file with the
# wrong owner would only show up later as a daemon traceback. This checks the
# directories and secrets it must use and stops with one line saying what to
# change on the host; then it starts the Zabbix agent in the background and
# replaces itself (exec) with the daemon, so that the SIGTERM tini forwards
# on `docker stop` reaches the daemon itself, which stops consuming and
# leaves unfinished messages unacknowledged (they are redelivered).
set -eu

DAEMON=cvmfs-repo-consumers
CONFIG=${CVMFS_PUBLISHER_CONFIG:-/etc/cvmfs-publisher/publisher.yaml}
AGENT_CONF=/etc/zabbix/zabbix_agentd.container.conf
AGENT_RUNTIME_CONF=/tmp/zabbix_agentd.runtime.conf

log() {
    printf '%s %s entrypoint: %s\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" "$DAEMON" "$*" >&2
}

die() {
    log "FATAL: $*"
    exit 78 # EX_CONFIG: the host or the compose file must change, not the code
}

check_access() {
    uid=$(id -u)
    gid=$(id -g)
    [ "$uid" != 0 ] || die "running as root: this container must run as its own user (user: \"10001:10001\")"
    for d in /data/cvmfs /var/log/publisher /var/lib/cvmfs-publisher /tmp; do
        [ -d "$d" ] || die "$d is missing: see docker-compose.yml for the volume to mount there"
        [ -w "$d" ] || die "$d is not writable by uid $uid gid $gid: on the host, e.g. chgrp $gid <dir> && chmod g+rwx <dir>"
    done
    # File secrets of docker compose are bind mounts of the host files, with
    # the host's owner and mode.
    for f in /run/secrets/*; do
        [ -e "$f" ] || continue
        [ -r "$f" ] || die "$f is not readable by uid $uid gid $gid: on the host, chgrp $gid <file> && chmod 0640 <file>"
    done
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
    zabbix_agentd --foreground -c "$AGENT_CONF" &
    log "Zabbix agent started (pid $!)"
}

umask 022 # staged files keep the modes the daemon gives them (DESIGN §2)
[ "$#" -gt 0 ] || set -- "$DAEMON" --config "$CONFIG"

check_access

# The agent runs next to the daemon only: a one-off command
# (`docker compose run --rm cvmfs-repo-consumers cvmfs-publisher status`) gets none.
if [ "$1" = "$DAEMON" ]; then
    start_zabbix_agent
fi

log "starting: $*"
exec "$@"
