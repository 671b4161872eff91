#!/usr/bin/env bash
# edgecells results retention: keep the SD card from filling.
#
#   cleanup.sh --results DIR [--max-mb N] [--min-free-mb N] [--keep-days N]
#              [--keep-latest N] [--active-minutes N] [--dry-run]
#
# Every entry directly under DIR is one session (a folder, or a file). Oldest first, it
# deletes sessions older than --keep-days (0 = no age limit), then more while the results
# use more than --max-mb or the file system has less than --min-free-mb free. It never
# deletes the newest --keep-latest sessions, nor one written to in the last
# --active-minutes (a session in progress). Defaults come from the RETENTION_* variables
# (deploy.env, via the service's EnvironmentFile).
set -euo pipefail

results=""
max_mb="${RETENTION_MAX_MB:-4096}"
min_free_mb="${RETENTION_MIN_FREE_MB:-2048}"
keep_days="${RETENTION_KEEP_DAYS:-0}"
keep_latest="${RETENTION_KEEP_LATEST:-1}"
active_minutes="${RETENTION_ACTIVE_MINUTES:-10}"
dry_run=0

say() { printf 'edgecells-cleanup: %s\n' "$*"; }
die() {
    printf 'edgecells-cleanup: error: %s\n' "$*" >&2
    exit 2
}
number() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 needs a whole number, got '$2'"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --results) results="${2:-}"; shift 2 ;;
        --max-mb) max_mb="${2:-}"; shift 2 ;;
        --min-free-mb) min_free_mb="${2:-}"; shift 2 ;;
        --keep-days) keep_days="${2:-}"; shift 2 ;;
        --keep-latest) keep_latest="${2:-}"; shift 2 ;;
        --active-minutes) active_minutes="${2:-}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[[ -n "$results" ]] || die "--results DIR is required"
for opt in max_mb min_free_mb keep_days keep_latest active_minutes; do
    number "--${opt//_/-}" "${!opt}"
done
if [[ ! -d "$results" ]]; then
    say "$results does not exist yet: nothing to do"
    exit 0
fi

now="$(date +%s)"
# One line per session: "<newest mtime in it> <size in KiB> <path>", oldest first.
list_sessions() {
    local entry newest size
    for entry in "$results"/* "$results"/.[!.]*; do
        [[ -e "$entry" || -L "$entry" ]] || continue
        newest="$(find "$entry" -printf '%T@\n' 2>/dev/null | sort -n | tail -n 1)"
        newest="${newest%.*}"
        size="$(du -sk "$entry" 2>/dev/null | cut -f1)"
        printf '%s %s %s\n' "${newest:-0}" "${size:-0}" "$entry"
    done | sort -n
}

mapfile -t sessions < <(list_sessions)
total_kb=0
for line in "${sessions[@]}"; do
    read -r _ kb _ <<<"$line"
    total_kb=$((total_kb + kb))
done
free_kb() { df -Pk "$results" | awk 'NR == 2 { print $4 }'; }
freed_kb=0
deleted=0
count=${#sessions[@]}

remove() {
    local path="$1" kb="$2" why="$3"
    if [[ "$dry_run" -eq 1 ]]; then
        say "would delete $path ($((kb / 1024)) MiB): $why"
    else
        rm -rf -- "$path"
        say "deleted $path ($((kb / 1024)) MiB): $why"
    fi
    total_kb=$((total_kb - kb))
    freed_kb=$((freed_kb + kb))
    deleted=$((deleted + 1))
}

for i in "${!sessions[@]}"; do
    read -r mtime kb path <<<"${sessions[$i]}"
    if ((i >= count - keep_latest)); then
        break # the newest sessions stay
    fi
    if ((now - mtime < active_minutes * 60)); then
        continue # being written
    fi
    why=""
    if ((keep_days > 0 && now - mtime > keep_days * 86400)); then
        why="older than $keep_days days"
    elif ((total_kb > max_mb * 1024)); then
        why="results use $((total_kb / 1024)) MiB > $max_mb MiB"
    else
        free_now=$(($(free_kb) + (dry_run ? freed_kb : 0)))
        if ((free_now < min_free_mb * 1024)); then
            why="$((free_now / 1024)) MiB free < $min_free_mb MiB"
        fi
    fi
    if [[ -n "$why" ]]; then
        remove "$path" "$kb" "$why"
    fi
done

free_end=$(($(free_kb) + (dry_run ? freed_kb : 0)))
say "$deleted of $count sessions deleted; results use $((total_kb / 1024)) MiB;" \
    "$((free_end / 1024)) MiB free"
if ((total_kb > max_mb * 1024 || free_end < min_free_mb * 1024)); then
    say "WARNING: still over the limits (only the newest or active sessions are left);" \
        "lower [session] frames or turn off annotate in config.toml"
fi
