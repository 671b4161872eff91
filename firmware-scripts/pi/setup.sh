#!/usr/bin/env bash
# Set up a Raspberry Pi (Raspberry Pi OS Bookworm 64-bit, Pi 4 or Pi 5) as an edgecells
# screening microscope. Safe to run again: it changes only what is not right yet.
#
#   sudo firmware-scripts/pi/setup.sh [options]
# Options:
#   --source URI        camera or file source (default picam:0, the Pi camera)
#   --pixel-size UM     micrometres per pixel on the slide (measure it; default from config)
#   --backend NAME      auto | litert | onnxruntime | openvino (default auto)
#   --threads N         inference threads (default: the number of CPU cores)
#   --mode MODE         continuous (screen from boot, sessions rotated daily) or triggered
#                       (start/stop a session with systemctl) (default continuous)
#   --package SPEC      what to pip install (default: this checkout, else "edgecells")
#   --extras LIST       runtime extras, e.g. onnx (default none: LiteRT is built in)
#   --reinstall         pip install again even if this version is installed
#   --no-start          install and enable, but do not start the service now
#   --no-camera-check   skip `rpicam-hello --list-cameras`
#   --force             run on something that does not look like a Raspberry Pi
#   --root DIR          write every file and folder under DIR, print system commands
#   --dry-run           change nothing; print every file, folder and command
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib/common.sh
. "$here/../lib/common.sh"
# shellcheck source=../lib/install.sh
. "$here/../lib/install.sh"
EC_TAG=edgecells-setup

ec_parse_common "$@"
set -- "${EC_ARGS[@]+"${EC_ARGS[@]}"}"

source_uri="picam:0"
pixel=""
backend="auto"
threads="$(nproc 2>/dev/null || echo 4)"
mode="continuous"
package=""
extras=""
start=1
camera_check=1
force=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --source) source_uri="${2:?--source needs a URI}"; EC_SET_SOURCE=1; shift 2 ;;
        --pixel-size) pixel="${2:?--pixel-size needs a number}"; EC_SET_PIXEL=1; shift 2 ;;
        --backend) backend="${2:?--backend needs a name}"; EC_SET_BACKEND=1; shift 2 ;;
        --threads) threads="${2:?--threads needs a number}"; EC_SET_THREADS=1; shift 2 ;;
        --mode) mode="${2:?--mode needs continuous or triggered}"; shift 2 ;;
        --package) package="${2:?--package needs a spec}"; shift 2 ;;
        --extras) extras="${2:?--extras needs a list}"; shift 2 ;;
        --reinstall) EC_REINSTALL=1; shift ;;
        --no-start) start=0; shift ;;
        --no-camera-check) camera_check=0; shift ;;
        --force) force=1; shift ;;
        -h | --help) sed -n '2,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) ec_die "unknown option $1 (see --help)" ;;
    esac
done
case "$mode" in continuous | triggered) ;; *) ec_die "--mode $mode: use continuous or triggered" ;; esac
case "$backend" in auto | litert | onnxruntime | openvino) ;; *) ec_die "--backend $backend: use auto, litert, onnxruntime or openvino" ;; esac
[[ "$threads" =~ ^[1-9][0-9]*$ ]] || ec_die "--threads $threads: need a whole number >= 1"
if [[ -n "$pixel" ]] && ! [[ "$pixel" =~ ^[0-9]*\.?[0-9]+$ ]]; then
    ec_die "--pixel-size $pixel: need a number of micrometres per pixel, e.g. 0.073"
fi
ec_check_extras "$extras"
package="${package:-$(ec_default_package)}"
ec_need_root
ec_load_settings
# The value a new config.toml gets when --pixel-size is not given (edge/config.py default).
pixel="${pixel:-0.073}"

# --- 1. the platform -------------------------------------------------------------------
if ec_live; then
    model="$(tr -d '\0' </proc/device-tree/model 2>/dev/null || true)"
    if [[ "$model" != *"Raspberry Pi"* && "$force" -eq 0 ]]; then
        ec_die "this does not look like a Raspberry Pi (${model:-no /proc/device-tree/model});" \
            "use --force to go on anyway, or --dry-run to see what would be done"
    fi
    [[ "$(uname -m)" == aarch64 ]] || ec_die "needs the 64-bit Raspberry Pi OS (uname -m says" \
        "$(uname -m)); the inference runtimes have no 32-bit wheels"
    # shellcheck disable=SC1091
    codename="$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")"
    case "$codename" in
        bookworm | trixie) ;;
        *) ec_warn "tested on Raspberry Pi OS Bookworm; this is '${codename:-unknown}'" ;;
    esac
    ec_log "platform: ${model:-unknown}, $codename"
fi

# --- 2. system packages: the camera stack comes from the OS, never from pip ---------------
packages=(python3-venv python3-pip python3-picamera2 python3-libcamera)
if ! { ec_live && { command -v rpicam-hello || command -v libcamera-hello; } >/dev/null 2>&1; }; then
    packages+=(rpicam-apps-lite)
fi
ec_apt_install "${packages[@]}"

# --- 3. user, folders, scripts, settings ------------------------------------------------
# video: the camera (/dev/video*, /dev/media*); render: the Pi 5's dma heaps.
ec_ensure_user "$EC_USER" video render
ec_folders
ec_firmware_files

# --- 4. Python: a venv that sees picamera2, edgecells with runtime extras only ------------
ec_venv python3
ec_pip_install "$package" "$extras"
if ec_live && ! "$EC_VENV/bin/python" -c 'import picamera2' 2>/dev/null; then
    ec_warn "picamera2 is not importable in $EC_VENV: check that python3-picamera2 is installed"
fi

# --- 5. configuration, units, first bundle ----------------------------------------------
ec_config "$source_uri" "$backend" "$threads" "$pixel"
ec_units "video render" "$mode"
ec_first_bundle

# --- 6. the camera ----------------------------------------------------------------------
if [[ "$camera_check" -eq 1 && "$source_uri" == picam:* ]]; then
    if ec_live; then
        lister="$(command -v rpicam-hello || command -v libcamera-hello || true)"
        if [[ -z "$lister" ]]; then
            ec_warn "rpicam-hello is missing: cannot list cameras"
        elif cams="$("$lister" --list-cameras 2>&1)" && grep -q '^[0-9]* : ' <<<"$cams"; then
            ec_log "camera found: $(grep -m1 '^[0-9]* : ' <<<"$cams")"
        else
            ec_warn "no camera found ($lister --list-cameras). Power off, check the ribbon" \
                "cable (contacts facing the right way), make sure /boot/firmware/config.txt has" \
                "camera_auto_detect=1, reboot, and run this script again"
        fi
    else
        printf 'would run: rpicam-hello --list-cameras\n'
        EC_PLANNED=$((EC_PLANNED + 1))
    fi
fi

# --- 7. services ------------------------------------------------------------------------
ec_services "$mode" "$start"

ec_summary
ec_log "next: run 'edgecells doctor --config $EC_CONFIG_DIR/config.toml'; logs:" \
    "'journalctl -u edgecells-screen -f'"
