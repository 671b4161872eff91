#!/usr/bin/env bash
# Start one screening session in a new folder under the results folder, then become
# `edgecells screen` (exec), so systemd's main process is the runtime itself (sd_notify,
# watchdog, SIGTERM -> the runtime writes the session summary).
#
#   run-session.sh --config FILE --results DIR [--edgecells PATH] [-- EXTRA SCREEN ARGS]
set -euo pipefail

config=/etc/edgecells/config.toml
results=/var/lib/edgecells/results
edgecells=edgecells
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) config="$2"; shift 2 ;;
        --results) results="$2"; shift 2 ;;
        --edgecells) edgecells="$2"; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
        *) printf 'run-session: unknown option %s\n' "$1" >&2; exit 2 ;;
    esac
done

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
session="$results/$stamp"
n=1
while [[ -e "$session" ]]; do
    session="$results/$stamp-$n"
    n=$((n + 1))
done
mkdir -p "$session"
printf 'edgecells: session folder %s\n' "$session"
exec "$edgecells" screen --config "$config" --out "$session" "${extra[@]}"
