#!/bin/bash
# Envoy that drains before it exits, for containers (Envoy itself exits at once on SIGTERM,
# cutting every request in flight: a client would get a 200 with a cut-off body).
#
#   envoy-drain.sh run ENVOY_ARGS...   run Envoy (through the official image's entrypoint when
#                                      there is one); on SIGTERM or SIGINT drain, then stop it
#                                      (docker-compose.yaml's Envoy entrypoint)
#   envoy-drain.sh drain               drain the Envoy next to this shell (a Kubernetes preStop hook)
#
# Draining: POST /drain_listeners?graceful to Envoy's admin interface, so Envoy closes
# connections as their requests end (run Envoy with --drain-strategy immediate), then wait
# until no downstream request is active, at most DRAIN_TIMEOUT seconds (default 20).
# Needs only bash (its /dev/tcp): the official Envoy image has no curl.
#
#   ENVOY_ADMIN    Envoy's admin address, default 127.0.0.1:9901
#   DRAIN_TIMEOUT  seconds to wait for requests in flight, default 20
#   ENVOY          the command that runs Envoy, default /docker-entrypoint.sh (else envoy)
set -u

ADMIN=${ENVOY_ADMIN:-127.0.0.1:9901}
TIMEOUT=${DRAIN_TIMEOUT:-20}

log() { echo "envoy-drain: $*" >&2; }

# admin METHOD PATH: the admin interface's response (headers and body) on stdout.
admin() {
  local fd
  exec {fd}<>"/dev/tcp/${ADMIN%:*}/${ADMIN##*:}" || return 1
  printf '%s %s HTTP/1.1\r\nHost: envoy\r\nConnection: close\r\n\r\n' "$1" "$2" >&"$fd"
  cat <&"$fd"
  exec {fd}<&-
}

# active: downstream requests in flight on every listener but the admin's own.
active() {
  admin GET '/stats?filter=downstream_rq_active' \
    | awk -F': ' '$1 ~ /^http\..*\.downstream_rq_active$/ && $1 !~ /^http\.admin\./ {n += $2} END {print n + 0}'
}

drain() {
  if ! admin POST '/drain_listeners?graceful' >/dev/null; then
    log "admin interface $ADMIN unreachable: not draining"
    return 0
  fi
  # Drained after two idle readings a second apart: a request whose bytes are still in a
  # socket buffer when the drain starts is not counted yet.
  local deadline=$((SECONDS + TIMEOUT)) n idle=0
  while ((idle < 2)); do
    n=$(active) || n=0
    if [ "$n" = 0 ]; then
      idle=$((idle + 1))
    else
      idle=0
      log "draining: $n requests in flight"
    fi
    if ((SECONDS >= deadline)); then
      log "$n requests still in flight after ${TIMEOUT}s: stopping anyway"
      return 0
    fi
    ((idle < 2)) && sleep 1
  done
  log "drained"
}

run() {
  local envoy=${ENVOY:-}
  if [ -z "$envoy" ]; then
    if [ -x /docker-entrypoint.sh ]; then envoy=/docker-entrypoint.sh; else envoy=envoy; fi
  fi
  "$envoy" "$@" &
  local pid=$! status
  trap 'drain; kill -TERM "$pid" 2>/dev/null' TERM INT
  while :; do
    wait "$pid"
    status=$?
    kill -0 "$pid" 2>/dev/null || break # wait also returns when a trap ran: Envoy may still run
  done
  exit "$status"
}

case "${1:-}" in
  run) shift; run "$@" ;;
  drain) drain ;;
  *) echo "usage: $0 run ENVOY_ARGS... | $0 drain" >&2; exit 2 ;;
esac
