#!/usr/bin/env bash
# Install a new edgecells model bundle on a device, safely.
#
#   update-bundle.sh BUNDLE            install BUNDLE (a folder, .tar.gz, .tgz or .zip)
#   update-bundle.sh --rollback        go back to the previous bundle
#   update-bundle.sh --list            show the installed bundles
# Options:
#   --bundles DIR      where bundles live (default: $EDGECELLS_DATA/bundles from deploy.env)
#   --python PATH      the Python with edgecells installed (default: the device venv's)
#   --health-cmd CMD   after switching, run CMD (bash -c); failure = roll back. Default on a
#                      device: restart edgecells-screen and check it stays active.
#   --no-restart       switch without restarting the service (and without a health check)
#   --root DIR         act on a scratch root (DIR/var/lib/edgecells/...), not the system
#   --dry-run          verify, then print what would change; change nothing
#
# A bundle is installed only if it verifies: schema and SHA-256 of every file
# (load_bundle), its signature (`edgecells bundle verify`: with trusted public keys in
# /etc/edgecells/trusted-keys or $EDGECELLS_TRUSTED_KEYS, unsigned or wrongly signed
# bundles are refused; without, they install with a warning) and a test inference on
# its sample cells giving the expected labels (`edgecells doctor --bundle B --only bundle`). It is copied to bundles/<name>-<hash>/,
# then the `current` symlink is switched to it with one rename (atomic: the service sees
# the old or the new bundle, never a mix), and `previous` points at the old one. If the
# health check fails, `current` goes back to the previous bundle. Exit codes: 0 installed
# (or already current), 1 refused (did not verify), 3 installed but rolled back.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib/common.sh
. "$here/lib/common.sh"
EC_TAG=edgecells-update-bundle

usage() { sed -n '2,24p' "${BASH_SOURCE[0]}"; }

ec_parse_common "$@"
set -- "${EC_ARGS[@]+"${EC_ARGS[@]}"}"

action=install
new=""
bundles=""
python=""
health_cmd=""
restart=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --rollback) action=rollback; shift ;;
        --list) action=list; shift ;;
        --bundles) bundles="${2:?--bundles needs a folder}"; shift 2 ;;
        --python) python="${2:?--python needs a path}"; shift 2 ;;
        --health-cmd) health_cmd="${2:?--health-cmd needs a command}"; shift 2 ;;
        --no-restart) restart=0; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) ec_die "unknown option $1 (see --help)" ;;
        *)
            [[ -z "$new" ]] || ec_die "one bundle at a time ($new and $1 given)"
            new="$1"
            shift
            ;;
    esac
done

# Settings: the shipped defaults, then the device's deploy.env.
# shellcheck source=config/defaults.env
. "$here/config/defaults.env"
if [[ -f "$(ec_path /etc/edgecells/deploy.env)" ]]; then
    # shellcheck disable=SC1090
    . "$(ec_path /etc/edgecells/deploy.env)"
fi
if [[ -z "$bundles" ]]; then
    bundles="$(ec_path "$EDGECELLS_DATA/bundles")"
fi
if [[ -z "$python" ]]; then
    python="$EDGECELLS_PREFIX/venv/bin/python"
    [[ -x "$python" ]] || python="$(command -v python3 || true)"
fi
# Trusted signing keys: $EDGECELLS_TRUSTED_KEYS (environment or deploy.env), else the
# device's /etc/edgecells/trusted-keys (under --root: ROOT/etc/edgecells/trusted-keys).
if [[ -z "${EDGECELLS_TRUSTED_KEYS:-}" && -d "$(ec_path /etc/edgecells/trusted-keys)" ]]; then
    EDGECELLS_TRUSTED_KEYS="$(ec_path /etc/edgecells/trusted-keys)"
fi
if [[ -n "${EDGECELLS_TRUSTED_KEYS:-}" ]]; then export EDGECELLS_TRUSTED_KEYS; fi
service=edgecells-screen.service
staging="" # the unpacked new bundle until it is moved into place (removed on exit)

current_target() {
    if [[ -L "$bundles/current" ]]; then readlink "$bundles/current"; fi
}
previous_target() {
    if [[ -L "$bundles/previous" ]]; then readlink "$bundles/previous"; fi
}
log_event() {
    [[ "$EC_DRY_RUN" -eq 1 ]] || printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" \
        >>"$bundles/update.log"
}

# point LINK (current|previous) at TARGET (a folder name in $bundles) with one rename.
point() {
    local link="$1" target="$2"
    if [[ "$EC_DRY_RUN" -eq 1 ]]; then
        printf 'would point %s/%s -> %s\n' "$bundles" "$link" "$target"
        return 0
    fi
    ln -sfn "$target" "$bundles/.$link.new"
    mv -fT "$bundles/.$link.new" "$bundles/$link"
}

service_known() {
    ec_live && command -v systemctl >/dev/null 2>&1 &&
        systemctl cat "$service" >/dev/null 2>&1
}

# Restart the service on the new bundle and check it is healthy.
check_health() {
    if [[ -n "$health_cmd" ]]; then
        if [[ "$EC_DRY_RUN" -eq 1 ]]; then
            printf 'would run health check: %s\n' "$health_cmd"
            return 0
        fi
        ec_log "health check: $health_cmd"
        EDGECELLS_BUNDLE="$bundles/current" bash -c "$health_cmd"
        return $?
    fi
    if [[ "$restart" -eq 0 ]]; then
        return 0
    fi
    if ! service_known; then
        ec_run systemctl try-restart "$service"
        return 0
    fi
    if ! systemctl is-active --quiet "$service"; then
        ec_log "$service is not running; it will use the new bundle when started"
        return 0
    fi
    ec_run systemctl restart "$service"
    ec_log "watching $service for ${UPDATE_SETTLE_SEC}s"
    sleep "$UPDATE_SETTLE_SEC"
    systemctl is-active --quiet "$service"
}

restart_quietly() {
    if [[ -z "$health_cmd" && "$restart" -eq 1 ]] && service_known &&
        systemctl is-enabled --quiet "$service"; then
        systemctl restart "$service" || true
    fi
}

verify() {
    local dir="$1"
    [[ -n "$python" && -x "$python" ]] ||
        ec_die "no Python with edgecells found (use --python PATH)"
    ec_log "verifying $dir (schema, hashes, signature, test inference)"
    "$python" -m edgecells bundle verify "$dir" || return 1
    "$python" -m edgecells doctor --bundle "$dir" --only bundle
}

do_list() {
    local cur prev d name
    cur="$(current_target)"
    prev="$(previous_target)"
    [[ -d "$bundles" ]] || ec_die "$bundles: no bundles installed"
    for d in "$bundles"/*/; do
        [[ -d "$d" && ! -L "${d%/}" ]] || continue
        name="$(basename "$d")"
        if [[ "$name" == "$cur" ]]; then
            printf '%s  (current)\n' "$name"
        elif [[ "$name" == "$prev" ]]; then
            printf '%s  (previous)\n' "$name"
        else
            printf '%s\n' "$name"
        fi
    done
}

do_rollback() {
    local cur prev
    cur="$(current_target)"
    prev="$(previous_target)"
    [[ -n "$prev" && -d "$bundles/$prev" ]] ||
        ec_die "$bundles/previous: no previous bundle to roll back to"
    verify "$bundles/$prev" || ec_die "$bundles/$prev: the previous bundle no longer verifies"
    point current "$prev"
    if [[ -n "$cur" ]]; then point previous "$cur"; fi
    log_event "rollback $cur -> $prev"
    ec_log "current bundle: $prev (was $cur)"
    check_health || ec_warn "$service is not healthy on $prev either: run edgecells doctor"
}

bundle_id() {
    local dir="$1" name hash
    name="$("$python" -c 'import json, re, sys
m = json.load(open(sys.argv[1], encoding="utf-8"))
print(re.sub(r"[^A-Za-z0-9._-]+", "-", str(m.get("name") or "bundle")).strip("-.") or "bundle")' \
        "$dir/manifest.json")"
    hash="$(sha256sum "$dir/manifest.json" | cut -c1-12)"
    printf '%s-%s' "$name" "$hash"
}

prune() {
    local keep="$1" cur prev d n=0
    cur="$(current_target)"
    prev="$(previous_target)"
    # newest first; current and previous always stay
    while IFS= read -r d; do
        d="$(basename "$d")"
        [[ "$d" == "$cur" || "$d" == "$prev" ]] && continue
        n=$((n + 1))
        if ((n > keep - 2)); then
            if [[ "$EC_DRY_RUN" -eq 1 ]]; then
                printf 'would delete old bundle %s\n' "$bundles/$d"
            else
                rm -rf -- "${bundles:?}/$d"
                ec_log "deleted old bundle $d"
            fi
        fi
    done < <(find "$bundles" -mindepth 1 -maxdepth 1 -type d ! -name '.*' -printf '%T@ %p\n' |
        sort -rn | cut -d' ' -f2-)
}

do_install() {
    local src id cur prev
    [[ -n "$new" ]] || ec_die "which bundle? (update-bundle.sh BUNDLE; see --help)"
    [[ -e "$new" ]] || ec_die "$new: no such bundle"
    if [[ "$EC_DRY_RUN" -eq 0 ]]; then mkdir -p "$bundles"; fi

    # Staged next to the bundles (same file system: the final move is a rename).
    if [[ "$EC_DRY_RUN" -eq 1 ]]; then
        staging="$(mktemp -d "${TMPDIR:-/tmp}/edgecells-bundle.XXXXXX")"
    else
        staging="$(mktemp -d "$bundles/.incoming.XXXXXX")"
    fi
    trap 'if [[ -n "$staging" ]]; then rm -rf -- "$staging"; fi' EXIT
    if [[ -d "$new" ]]; then
        [[ -f "$new/manifest.json" ]] || ec_die "$new: no manifest.json (not a model bundle)"
        cp -R -- "$new/." "$staging/"
        src="$staging"
    else
        "$python" -c 'import sys
from edgecells.edge.bundle import extract_archive
from edgecells.edge.errors import EdgecellsError
try:
    extract_archive(sys.argv[1], sys.argv[2])
except EdgecellsError as exc:
    sys.exit(f"error: {exc}")' "$new" "$staging" || ec_die "$new: cannot unpack"
        src="$staging"
        if [[ ! -f "$src/manifest.json" ]]; then
            mapfile -t inner < <(find "$staging" -mindepth 1 -maxdepth 1 -type d)
            if [[ ${#inner[@]} -eq 1 && -f "${inner[0]}/manifest.json" ]]; then
                src="${inner[0]}"
            else
                ec_die "$new: the archive holds no manifest.json"
            fi
        fi
    fi

    if ! verify "$src"; then
        log_event "refused $new (did not verify)"
        ec_log "refused $new: it did not verify (see above); the installed bundle is unchanged"
        exit 1
    fi
    id="$(bundle_id "$src")"
    cur="$(current_target)"
    if [[ "$cur" == "$id" && -d "$bundles/$id" ]] && verify "$bundles/$id" >/dev/null 2>&1; then
        ec_log "$id is already the current bundle: nothing to do"
        return 0
    fi

    if [[ "$EC_DRY_RUN" -eq 1 ]]; then
        printf 'would install %s as %s/%s\n' "$new" "$bundles" "$id"
    else
        if [[ -e "$bundles/$id" ]]; then
            rm -rf -- "${bundles:?}/.old.$id"
            mv -T -- "$bundles/$id" "$bundles/.old.$id"
        fi
        chmod -R a+rX,go-w "$src"
        mv -T -- "$src" "$bundles/$id"
        rm -rf -- "${bundles:?}/.old.$id"
        touch "$bundles/$id"
    fi
    point current "$id"
    if [[ -n "$cur" && "$cur" != "$id" ]]; then point previous "$cur"; fi
    log_event "installed $id from $new (previous: ${cur:-none})"
    ec_log "current bundle: $id (previous: ${cur:-none})"

    if ! check_health; then
        prev="$cur"
        if [[ -n "$prev" && -d "$bundles/$prev" ]]; then
            ec_warn "the service is not healthy on $id: rolling back to $prev"
            point current "$prev"
            point previous "$id"
            log_event "rolled back $id -> $prev (health check failed)"
            restart_quietly
            ec_log "current bundle: $prev (rolled back; $id stays installed, not in use)"
            exit 3
        fi
        ec_warn "the service is not healthy on $id and there is no previous bundle:" \
            "run edgecells doctor"
        exit 3
    fi
    prune "$BUNDLES_KEEP"
}

case "$action" in
    list) do_list ;;
    rollback) (
        exec 9>>"$bundles/.lock"
        flock -n 9 || ec_die "another bundle update is running"
        do_rollback
    ) ;;
    install)
        if [[ "$EC_DRY_RUN" -eq 1 ]]; then
            do_install
        else
            mkdir -p "$bundles"
            exec 9>>"$bundles/.lock"
            flock -n 9 || ec_die "another bundle update is running"
            do_install
        fi
        ;;
esac
