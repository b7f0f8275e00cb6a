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

# shellcheck source-path=SCRIPTDIR source=../container/lib.sh
. /usr/local/lib/cvmfs-publisher/lib.sh

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

umask 022 # staged files keep the modes the daemon gives them (DESIGN §2)
[ "$#" -gt 0 ] || set -- "$DAEMON" --config "$CONFIG"

check_access

run_daemon "$@"
