# shellcheck shell=bash
# Shared helpers for the edgecells firmware scripts. Source it, do not run it.
#
# Every script that changes the system goes through these helpers, so that
#   --root DIR  writes every file and folder under DIR instead of / and prints the
#               system commands (apt-get, useradd, systemctl, pip) instead of running them;
#   --dry-run   writes nothing at all and prints every file, folder and command.
# Files are written only when their content differs (re-running changes nothing
# that is already right), through a temporary file and a rename (never half-written).

EC_ROOT=""      # prefix for every path written ("" = the real system)
EC_DRY_RUN=0    # 1 = write nothing, print what would be done
EC_CHANGED=0    # number of files, folders and commands that changed something
EC_PLANNED=0    # system commands printed, not run (--root / --dry-run)
EC_TAG="${EC_TAG:-edgecells}"

ec_log() { printf '%s: %s\n' "$EC_TAG" "$*" >&2; }
ec_warn() { printf '%s: WARNING: %s\n' "$EC_TAG" "$*" >&2; }
ec_die() {
    printf '%s: error: %s\n' "$EC_TAG" "$*" >&2
    exit 1
}

# True when the script acts on the real system (no --root, no --dry-run).
ec_live() { [[ -z "$EC_ROOT" && "$EC_DRY_RUN" -eq 0 ]]; }

# ec_path /etc/x -> where /etc/x is written ($EC_ROOT/etc/x under --root).
ec_path() { printf '%s%s' "$EC_ROOT" "$1"; }

# Parse the options every script shares; sets EC_ARGS to what is left.
ec_parse_common() {
    EC_ARGS=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --root)
                [[ $# -ge 2 ]] || ec_die "--root needs a folder"
                EC_ROOT="${2%/}"
                shift 2
                ;;
            --root=*)
                EC_ROOT="${1#--root=}"
                EC_ROOT="${EC_ROOT%/}"
                shift
                ;;
            --dry-run)
                EC_DRY_RUN=1
                shift
                ;;
            *)
                EC_ARGS+=("$1")
                shift
                ;;
        esac
    done
    if [[ -n "$EC_ROOT" ]]; then
        [[ "$EC_ROOT" == /* ]] || EC_ROOT="$PWD/$EC_ROOT"
        if [[ "$EC_DRY_RUN" -eq 0 ]]; then
            mkdir -p "$EC_ROOT"
        fi
    fi
}

# Run a command that changes the system; under --root/--dry-run print it instead.
ec_run() {
    if ec_live; then
        ec_log "run: $*"
        "$@"
        EC_CHANGED=$((EC_CHANGED + 1))
    else
        printf 'would run: %s\n' "$*"
        EC_PLANNED=$((EC_PLANNED + 1))
    fi
}

# ec_mkdir DIR [MODE] [OWNER:GROUP] -- create a folder (and set mode/owner) if needed.
ec_mkdir() {
    local dir="$1" mode="${2:-}" owner="${3:-}" target
    target="$(ec_path "$dir")"
    if [[ ! -d "$target" ]]; then
        if [[ "$EC_DRY_RUN" -eq 1 ]]; then
            printf 'would create folder: %s\n' "$target"
        else
            mkdir -p "$target"
            ec_log "created folder $target"
        fi
        EC_CHANGED=$((EC_CHANGED + 1))
    fi
    if [[ -n "$mode" && "$EC_DRY_RUN" -eq 0 && -d "$target" ]]; then
        if [[ "$(stat -c '%a' "$target")" != "${mode#0}" ]]; then
            chmod "$mode" "$target"
            EC_CHANGED=$((EC_CHANGED + 1))
        fi
    fi
    if [[ -n "$owner" ]]; then
        ec_own "$target" "$owner"
    fi
}

# ec_own PATH USER:GROUP -- only on the live system (a scratch root has no such user).
ec_own() {
    local target="$1" owner="$2"
    if ec_live; then
        if [[ "$(stat -c '%U:%G' "$target")" != "$owner" ]]; then
            chown "$owner" "$target"
            EC_CHANGED=$((EC_CHANGED + 1))
        fi
    else
        printf 'would run: chown %s %s\n' "$owner" "$target"
        EC_PLANNED=$((EC_PLANNED + 1))
    fi
}

# ec_install_content DEST MODE [--keep] < content
# Writes stdin to DEST when it differs. --keep: never replace an existing file (user config).
ec_install_content() {
    local dest="$1" mode="$2" keep="${3:-}" target tmp
    target="$(ec_path "$dest")"
    tmp="$(mktemp)"
    cat >"$tmp"
    if [[ -e "$target" ]]; then
        if cmp -s "$tmp" "$target"; then
            rm -f "$tmp"
            if [[ "$EC_DRY_RUN" -eq 0 && "$(stat -c '%a' "$target")" != "${mode#0}" ]]; then
                chmod "$mode" "$target"
                EC_CHANGED=$((EC_CHANGED + 1))
            fi
            return 0
        fi
        if [[ "$keep" == "--keep" ]]; then
            rm -f "$tmp"
            ec_log "kept $target (edited locally; the shipped default differs)"
            return 0
        fi
    fi
    EC_CHANGED=$((EC_CHANGED + 1))
    if [[ "$EC_DRY_RUN" -eq 1 ]]; then
        printf 'would write: %s\n' "$target"
        rm -f "$tmp"
        return 0
    fi
    mkdir -p "$(dirname "$target")"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$target"
    ec_log "wrote $target"
}

# ec_render TEMPLATE KEY=VALUE... -- print TEMPLATE with every @KEY@ replaced.
ec_render() {
    local template="$1" text pair key value
    shift
    [[ -f "$template" ]] || ec_die "$template: template is missing"
    text="$(<"$template")"
    for pair in "$@"; do
        key="${pair%%=*}"
        value="${pair#*=}"
        text="${text//@"$key"@/$value}"
    done
    if [[ "$text" =~ @[A-Z_]+@ ]]; then
        ec_die "$template: placeholder ${BASH_REMATCH[0]} has no value"
    fi
    printf '%s\n' "$text"
}

# ec_need_root -- the live system needs root; --root/--dry-run do not.
ec_need_root() {
    if ec_live && [[ "$(id -u)" -ne 0 ]]; then
        ec_die "run this as root (sudo $0 ...), or try it first with --dry-run"
    fi
}

# ec_apt_install PKG... -- install the Debian packages that are not installed yet.
ec_apt_install() {
    local missing=() pkg
    if ec_live; then
        for pkg in "$@"; do
            if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
                missing+=("$pkg")
            fi
        done
    else
        missing=("$@")
    fi
    if [[ ${#missing[@]} -eq 0 ]]; then
        ec_log "system packages already installed: $*"
        return 0
    fi
    ec_run env DEBIAN_FRONTEND=noninteractive apt-get update -q
    ec_run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}"
}

# ec_ensure_user NAME GROUP... -- a system user with its own group, in the given groups.
ec_ensure_user() {
    local name="$1" group have
    shift
    if ! ec_live; then
        ec_run useradd --system --user-group --home-dir "$EC_DATA_DIR" --no-create-home \
            --shell /usr/sbin/nologin "$name"
        for group in "$@"; do
            ec_run usermod -aG "$group" "$name"
        done
        return 0
    fi
    if ! id -u "$name" >/dev/null 2>&1; then
        ec_run useradd --system --user-group --home-dir "$EC_DATA_DIR" --no-create-home \
            --shell /usr/sbin/nologin "$name"
    fi
    have=" $(id -nG "$name") "
    for group in "$@"; do
        if getent group "$group" >/dev/null && [[ "$have" != *" $group "* ]]; then
            ec_run usermod -aG "$group" "$name"
        fi
    done
}

# ec_summary -- the last line every script prints.
ec_summary() {
    if [[ "$EC_DRY_RUN" -eq 1 ]]; then
        ec_log "dry run: nothing was changed ($EC_CHANGED file changes and $EC_PLANNED" \
            "system commands listed above)"
        return 0
    fi
    if [[ -n "$EC_ROOT" ]]; then
        ec_log "wrote into $EC_ROOT: $EC_CHANGED changes; $EC_PLANNED system commands" \
            "printed, not run"
        return 0
    fi
    if [[ "$EC_CHANGED" -eq 0 ]]; then
        ec_log "everything was already in place: nothing changed"
    else
        ec_log "done: $EC_CHANGED changes"
    fi
}
