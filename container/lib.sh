# shellcheck shell=sh
# Functions shared by the entrypoints of the three images, which source this
# file from /usr/local/lib/cvmfs-publisher/lib.sh (copied there by each
# Dockerfile) after setting:
#   DAEMON              the daemon the image runs (log prefix; the command
#                       that gets a Zabbix agent next to it)
#   AGENT_CONF          the agent's configuration file in the image
#   AGENT_RUNTIME_CONF  where the agent's runtime configuration is written
#   AGENT_RUN_DIR       optional: created for user zabbix before the agent
#                       starts (images running as root, whose agent drops to
#                       user zabbix)
# Not executable on its own: it only defines functions.

log() {
    printf '%s %s entrypoint: %s\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" "$DAEMON" "$*" >&2
}

die() {
    log "FATAL: $*"
    exit 78 # EX_CONFIG: the host or the compose file must change, not the code
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
    port=${ZBX_LISTEN_PORT:-10050}
    case $port in
        "" | *[!0-9]*) die "ZBX_LISTEN_PORT=$port: expected a TCP port number" ;;
    esac
    # zabbix_agentd's own limits; past them it exits at once with only a parse error.
    if [ "$port" -lt 1024 ] || [ "$port" -gt 32767 ]; then
        die "ZBX_LISTEN_PORT=$port: zabbix_agentd accepts 1024-32767 only"
    fi
    host=""
    if [ -n "${ZBX_HOSTNAME:-}" ]; then
        host=$(agent_value ZBX_HOSTNAME "$ZBX_HOSTNAME")
    fi
    {
        printf '# Written by entrypoint.sh at container start from the ZBX_* environment.\n'
        printf 'Server=%s\n' "$server"
        printf 'ListenPort=%s\n' "$port"
        [ -z "$active" ] || printf 'ServerActive=%s\n' "$active"
        [ -z "$host" ] || printf 'Hostname=%s\n' "$host"
    } >"$AGENT_RUNTIME_CONF.tmp"
    mv "$AGENT_RUNTIME_CONF.tmp" "$AGENT_RUNTIME_CONF"
    if [ -n "${AGENT_RUN_DIR:-}" ]; then
        # The agent drops to user zabbix (it only reads the status documents).
        install -d -o zabbix -g zabbix -m 0755 "$AGENT_RUN_DIR"
    fi
    zabbix_agentd --foreground -c "$AGENT_CONF" &
    log "Zabbix agent started (pid $!, port $port)"
}

# run_daemon COMMAND [ARG...]: the last step of every entrypoint. Starts the
# agent when COMMAND is the daemon (a one-off command such as
# `docker compose run --rm <service> cvmfs-publisher status` gets none), then
# replaces the shell with COMMAND, so that the SIGTERM tini forwards on
# `docker stop` reaches the daemon itself.
run_daemon() {
    if [ "$1" = "$DAEMON" ]; then
        start_zabbix_agent
    fi
    log "starting: $*"
    exec "$@"
}
