# shellcheck shell=bash
# The install steps shared by pi/setup.sh and jetson/setup.sh. Source after common.sh.
# Every step is idempotent: it checks first and changes only what is not right yet.

EC_FIRMWARE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EC_DEPLOY_ENV=/etc/edgecells/deploy.env
EC_CONFIG_DIR=/etc/edgecells

# Settings: the shipped defaults, then the device's deploy.env (its edits win).
ec_load_settings() {
    # shellcheck source=../config/defaults.env
    . "$EC_FIRMWARE_DIR/config/defaults.env"
    if [[ -f "$(ec_path "$EC_DEPLOY_ENV")" ]]; then
        # shellcheck disable=SC1090
        . "$(ec_path "$EC_DEPLOY_ENV")"
    fi
    EC_DATA_DIR="$EDGECELLS_DATA"
    EC_PREFIX="$EDGECELLS_PREFIX"
    EC_USER="$EDGECELLS_USER"
    EC_VENV="$EC_PREFIX/venv"
}

# The edgecells version a package spec will install ("" = unknown, always pip install).
ec_spec_version() {
    local spec="$1"
    if [[ -f "$spec/pyproject.toml" ]]; then
        sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$spec/pyproject.toml" | head -n 1
    elif [[ "$spec" == *"=="* ]]; then
        printf '%s' "${spec##*==}"
    fi
}

# The checkout these scripts came from, if they run from one; else the PyPI name.
ec_default_package() {
    local repo
    repo="$(cd "$EC_FIRMWARE_DIR/.." && pwd)"
    if [[ -f "$repo/pyproject.toml" ]] && grep -q '^name = "edgecells"' "$repo/pyproject.toml"; then
        printf '%s' "$repo"
    else
        printf 'edgecells'
    fi
}

ec_check_extras() {
    local extras="$1" e
    IFS=',' read -r -a _extras <<<"$extras"
    for e in "${_extras[@]+"${_extras[@]}"}"; do
        case "$e" in
            convert | test) ec_die "--extras $e: host-only tools (TensorFlow...) do not belong on a device" ;;
            "" | onnx | openvino) ;;
            *) ec_die "--extras $e: unknown (runtime extras: onnx, openvino)" ;;
        esac
    done
}

# ec_folders -- the configuration, program and data folders.
ec_folders() {
    ec_mkdir "$EC_CONFIG_DIR" 0755
    ec_mkdir "$EC_PREFIX" 0755
    ec_mkdir "$EC_PREFIX/firmware" 0755
    ec_mkdir "$EC_PREFIX/firmware/lib" 0755
    ec_mkdir "$EC_PREFIX/firmware/config" 0755
    ec_mkdir "$EC_DATA_DIR" 0750 "$EC_USER:$EC_USER"
    ec_mkdir "$EC_DATA_DIR/results" 0750 "$EC_USER:$EC_USER"
    ec_mkdir "$EC_DATA_DIR/cache" 0750 "$EC_USER:$EC_USER"
    ec_mkdir "$EC_DATA_DIR/cache/numba" 0750 "$EC_USER:$EC_USER"
    ec_mkdir "$EC_DATA_DIR/bundles" 0755
}

# ec_firmware_files -- the scripts the services and the operator use, copied to PREFIX.
ec_firmware_files() {
    local f
    for f in update-bundle.sh cleanup.sh run-session.sh; do
        ec_install_content "$EC_PREFIX/firmware/$f" 0755 <"$EC_FIRMWARE_DIR/$f"
    done
    ec_install_content "$EC_PREFIX/firmware/lib/common.sh" 0644 <"$EC_FIRMWARE_DIR/lib/common.sh"
    ec_install_content "$EC_PREFIX/firmware/config/defaults.env" 0644 \
        <"$EC_FIRMWARE_DIR/config/defaults.env"
    ec_install_content "$EC_PREFIX/firmware/config/constraints.txt" 0644 \
        <"$EC_FIRMWARE_DIR/config/constraints.txt"
    # deploy.env: written once; from then on the device's own settings file.
    # (no pipes into ec_install_content: it must run in this shell to count changes)
    local text
    text="$(
        printf '# edgecells deployment settings (from firmware-scripts/config/defaults.env).\n'
        printf '# Edit, then re-run setup.sh to apply to the services.\n\n'
        grep -v '^# Defaults for' "$EC_FIRMWARE_DIR/config/defaults.env"
    )"
    ec_install_content "$EC_DEPLOY_ENV" 0644 --keep <<<"$text"
    ec_symlink /usr/local/bin/edgecells "$EC_VENV/bin/edgecells"
    ec_symlink /usr/local/sbin/edgecells-update-bundle "$EC_PREFIX/firmware/update-bundle.sh"
}

# ec_symlink LINK TARGET
ec_symlink() {
    local link target
    link="$(ec_path "$1")"
    target="$2"
    if [[ -L "$link" && "$(readlink "$link")" == "$target" ]]; then
        return 0
    fi
    EC_CHANGED=$((EC_CHANGED + 1))
    if [[ "$EC_DRY_RUN" -eq 1 ]]; then
        printf 'would link: %s -> %s\n' "$link" "$target"
        return 0
    fi
    mkdir -p "$(dirname "$link")"
    ln -sfn "$target" "$link"
    ec_log "linked $link -> $target"
}

# ec_set_key TEXT_FILE KEY VALUE -- replace the line "KEY = ..." (first match) in a file.
ec_set_key() {
    local file="$1" key="$2" value="$3"
    grep -q "^$key = " "$file" || ec_die "$(ec_path "$EC_CONFIG_DIR/config.toml"): has no" \
        "'$key = ' line to change; edit it by hand"
    KEY="$key" VALUE="$value" awk '
        !done && index($0, ENVIRON["KEY"] " = ") == 1 {
            print ENVIRON["KEY"] " = " ENVIRON["VALUE"]; done = 1; next
        }
        { print }' "$file" >"$file.tmp"
    mv -f "$file.tmp" "$file"
}

toml_string() {
    local s="$1"
    s="${s//\\/\\\\}"
    s="${s//\"/\\\"}"
    printf '"%s"' "$s"
}

# ec_config SOURCE BACKEND THREADS PIXEL_SIZE -- config.toml: created once from the template;
# afterwards only the keys given explicitly on this run (EC_SET_* = 1) are changed.
ec_config() {
    local source="$1" backend="$2" threads="$3" pixel="$4" target work
    target="$(ec_path "$EC_CONFIG_DIR/config.toml")"
    work="$(mktemp)"
    if [[ -f "$target" ]]; then
        cp "$target" "$work"
        if [[ "${EC_SET_SOURCE:-0}" -eq 1 ]]; then ec_set_key "$work" source "$(toml_string "$source")"; fi
        if [[ "${EC_SET_BACKEND:-0}" -eq 1 ]]; then ec_set_key "$work" backend "$(toml_string "$backend")"; fi
        if [[ "${EC_SET_THREADS:-0}" -eq 1 ]]; then ec_set_key "$work" threads "$threads"; fi
        if [[ "${EC_SET_PIXEL:-0}" -eq 1 ]]; then ec_set_key "$work" pixel_size_um "$pixel"; fi
    else
        ec_render "$EC_FIRMWARE_DIR/config/config.toml.in" \
            "SOURCE=${source//\"/\\\"}" "BACKEND=$backend" "THREADS=$threads" \
            "PIXEL_SIZE_UM=$pixel" "DATA_DIR=$EC_DATA_DIR" "CONFIG_DIR=$EC_CONFIG_DIR" >"$work"
    fi
    ec_install_content "$EC_CONFIG_DIR/config.toml" 0644 <"$work"
    rm -f "$work"
}

# ec_units GROUPS MODE -- render the systemd units and the journald cap.
EC_UNITS_CHANGED=0
ec_units() {
    local groups="$1" mode="$2" unit before text
    local keys=(
        "USER=$EC_USER" "GROUPS=$groups" "DATA_DIR=$EC_DATA_DIR" "PREFIX=$EC_PREFIX"
        "CONFIG_DIR=$EC_CONFIG_DIR" "RESTART_SEC=$RESTART_SEC" "WATCHDOG_SEC=$WATCHDOG_SEC"
        "START_LIMIT_BURST=$START_LIMIT_BURST"
        "START_LIMIT_INTERVAL_SEC=$START_LIMIT_INTERVAL_SEC"
        "TIMEOUT_START_SEC=$TIMEOUT_START_SEC" "TIMEOUT_STOP_SEC=$TIMEOUT_STOP_SEC"
        "JOURNAL_MAX_USE=$JOURNAL_MAX_USE" "ROTATE_CALENDAR=$ROTATE_CALENDAR"
    )
    before=$EC_CHANGED
    for unit in edgecells-screen.service edgecells-cleanup.service edgecells-cleanup.timer; do
        text="$(ec_render "$EC_FIRMWARE_DIR/systemd/$unit.in" "${keys[@]}")"
        ec_install_content "/etc/systemd/system/$unit" 0644 <<<"$text"
    done
    if [[ "$mode" == continuous && -n "$ROTATE_CALENDAR" ]]; then
        for unit in edgecells-rotate.service edgecells-rotate.timer; do
            text="$(ec_render "$EC_FIRMWARE_DIR/systemd/$unit.in" "${keys[@]}")"
            ec_install_content "/etc/systemd/system/$unit" 0644 <<<"$text"
        done
    fi
    if [[ $EC_CHANGED -ne $before ]]; then EC_UNITS_CHANGED=1; fi
    before=$EC_CHANGED
    text="$(ec_render "$EC_FIRMWARE_DIR/systemd/journald-edgecells.conf.in" "${keys[@]}")"
    ec_install_content /etc/systemd/journald.conf.d/edgecells.conf 0644 <<<"$text"
    if [[ $EC_CHANGED -ne $before ]]; then
        ec_run systemctl restart systemd-journald
    fi
    if [[ "$EC_UNITS_CHANGED" -eq 1 ]]; then
        ec_run systemctl daemon-reload
    fi
}

# ec_venv PYTHON -- a venv that sees the OS's Python packages (picamera2, TensorRT, cv2).
ec_venv() {
    local python="$1" cfg
    cfg="$(ec_path "$EC_VENV/pyvenv.cfg")"
    if [[ -f "$cfg" ]] && grep -q '^include-system-site-packages = true' "$cfg"; then
        return 0
    fi
    if [[ -f "$cfg" ]]; then
        ec_warn "$EC_VENV does not see the system packages: recreating it"
        ec_run "$python" -m venv --clear --system-site-packages "$EC_VENV"
    else
        ec_run "$python" -m venv --system-site-packages "$EC_VENV"
    fi
    ec_run "$EC_VENV/bin/python" -m pip install --quiet --upgrade pip
}

# ec_pip_install PACKAGE EXTRAS [PIP ARGS...] -- edgecells with runtime extras only.
ec_pip_install() {
    local package="$1" extras="$2" spec want have
    shift 2
    spec="$package"
    if [[ -n "$extras" ]]; then spec="${package}[${extras}]"; fi
    want="$(ec_spec_version "$package")"
    if ec_live && [[ -n "$want" && -x "$EC_VENV/bin/python" ]]; then
        have="$("$EC_VENV/bin/python" -c 'import edgecells; print(edgecells.__version__)' \
            2>/dev/null || true)"
        if [[ "$have" == "$want" && "${EC_REINSTALL:-0}" -eq 0 ]]; then
            ec_log "edgecells $have already installed in $EC_VENV"
            return 0
        fi
    fi
    ec_run "$EC_VENV/bin/python" -m pip install --quiet \
        --constraint "$EC_PREFIX/firmware/config/constraints.txt" "$@" "$spec"
}

# ec_first_bundle -- install the reference bundle shipped in the package, once.
ec_first_bundle() {
    local current
    current="$(ec_path "$EC_DATA_DIR/bundles/current")"
    if [[ -L "$current" ]]; then
        return 0
    fi
    if ec_live; then
        local ref
        ref="$("$EC_VENV/bin/python" -c \
            'from edgecells.edge.bundle import default_bundle_path; print(default_bundle_path())')"
        ec_run "$EC_PREFIX/firmware/update-bundle.sh" --no-restart "$ref"
    else
        printf 'would run: %s --no-restart <the reference bundle shipped in edgecells>\n' \
            "$EC_PREFIX/firmware/update-bundle.sh"
        EC_PLANNED=$((EC_PLANNED + 1))
    fi
}

# ec_services MODE START -- continuous: on at boot (and started); triggered: started by hand.
ec_services() {
    local mode="$1" start="$2"
    if ! ec_live; then
        ec_run systemctl enable --now edgecells-cleanup.timer
        if [[ "$mode" == continuous ]]; then
            ec_run systemctl enable edgecells-screen.service
            if [[ -n "$ROTATE_CALENDAR" ]]; then ec_run systemctl enable --now edgecells-rotate.timer; fi
            if [[ "$start" -eq 1 ]]; then ec_run systemctl restart edgecells-screen.service; fi
        else
            ec_run systemctl disable edgecells-screen.service
        fi
        return 0
    fi
    systemctl is-enabled --quiet edgecells-cleanup.timer ||
        ec_run systemctl enable --now edgecells-cleanup.timer
    if [[ "$mode" == continuous ]]; then
        systemctl is-enabled --quiet edgecells-screen.service ||
            ec_run systemctl enable edgecells-screen.service
        if [[ -n "$ROTATE_CALENDAR" ]]; then
            systemctl is-enabled --quiet edgecells-rotate.timer ||
                ec_run systemctl enable --now edgecells-rotate.timer
        fi
        if [[ "$start" -eq 1 ]]; then
            if ! systemctl is-active --quiet edgecells-screen.service; then
                ec_run systemctl start edgecells-screen.service
            elif [[ "$EC_UNITS_CHANGED" -eq 1 ]]; then
                ec_run systemctl restart edgecells-screen.service
            fi
        fi
    else
        if systemctl is-enabled --quiet edgecells-screen.service; then
            ec_run systemctl disable edgecells-screen.service
        fi
        if systemctl is-enabled --quiet edgecells-rotate.timer 2>/dev/null; then
            ec_run systemctl disable --now edgecells-rotate.timer
        fi
    fi
}
