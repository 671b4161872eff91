#!/usr/bin/env bash
# Set up an NVIDIA Jetson (JetPack 6, L4T R36; JetPack 5, L4T R35 with Python >= 3.10) as
# an edgecells screening microscope: ONNX Runtime with the CUDA and TensorRT execution
# providers from NVIDIA's Jetson wheels, TensorRT's trtexec, the same service as on a Pi.
# Safe to run again: it changes only what is not right yet.
#
#   sudo firmware-scripts/jetson/setup.sh [options]
# Options:
#   --source URI        frame source (default: the CSI camera through nvarguscamerasrc,
#                       see CSI_PIPELINE below; a USB camera is cv:0)
#   --pixel-size UM     micrometres per pixel on the slide (measure it)
#   --backend NAME      auto | onnxruntime | litert | openvino (default onnxruntime)
#   --threads N         inference threads (default: the number of CPU cores)
#   --mode MODE         continuous or triggered (default continuous; see pi/setup.sh)
#   --package SPEC      what to pip install (default: this checkout, else "edgecells")
#   --ort-index URL     pip index with onnxruntime-gpu for this JetPack (default: NVIDIA's
#                       Jetson AI Lab index for JetPack 6)
#   --ort-wheel SPEC    an onnxruntime-gpu wheel file or URL instead (JetPack 5: from the
#                       Jetson Zoo, https://elinux.org/Jetson_Zoo#ONNX_Runtime)
#   --python PATH       the Python to build the venv from (default python3; needs >= 3.10)
#   --reinstall, --no-start, --no-camera-check, --force, --root DIR, --dry-run: as pi/setup.sh
#
# The CSI camera for the gst: source (Argus; exposure and white balance locked for the
# session; BGR frames into OpenCV's appsink), the same as edge/sources/gstreamer.py's:
#   gst:nvarguscamerasrc sensor-id=0 aelock=true awblock=true
#   ! video/x-raw(memory:NVMM),width=1280,height=720,framerate=30/1 ! nvvidconv
#   ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR
#   ! appsink drop=true max-buffers=2
# (one line). Test the camera alone first:
#   gst-launch-1.0 nvarguscamerasrc num-buffers=30 ! fakesink
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib/common.sh
. "$here/../lib/common.sh"
# shellcheck source=../lib/install.sh
. "$here/../lib/install.sh"
EC_TAG=edgecells-setup

CSI_PIPELINE='nvarguscamerasrc sensor-id=0 aelock=true awblock=true ! video/x-raw(memory:NVMM),width=1280,height=720,framerate=30/1 ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=2'

ec_parse_common "$@"
set -- "${EC_ARGS[@]+"${EC_ARGS[@]}"}"

source_uri="gst:$CSI_PIPELINE"
pixel=""
backend="onnxruntime"
threads="$(nproc 2>/dev/null || echo 4)"
mode="continuous"
package=""
ort_index=""
ort_wheel=""
python=python3
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
        --ort-index) ort_index="${2:?--ort-index needs a URL}"; shift 2 ;;
        --ort-wheel) ort_wheel="${2:?--ort-wheel needs a file or URL}"; shift 2 ;;
        --python) python="${2:?--python needs a path}"; shift 2 ;;
        --reinstall) EC_REINSTALL=1; shift ;;
        --no-start) start=0; shift ;;
        --no-camera-check) camera_check=0; shift ;;
        --force) force=1; shift ;;
        -h | --help) sed -n '2,31p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) ec_die "unknown option $1 (see --help)" ;;
    esac
done
case "$mode" in continuous | triggered) ;; *) ec_die "--mode $mode: use continuous or triggered" ;; esac
case "$backend" in auto | litert | onnxruntime | openvino) ;; *) ec_die "--backend $backend: use auto, onnxruntime, litert or openvino" ;; esac
[[ "$threads" =~ ^[1-9][0-9]*$ ]] || ec_die "--threads $threads: need a whole number >= 1"
if [[ -n "$pixel" ]] && ! [[ "$pixel" =~ ^[0-9]*\.?[0-9]+$ ]]; then
    ec_die "--pixel-size $pixel: need a number of micrometres per pixel, e.g. 0.073"
fi
package="${package:-$(ec_default_package)}"
ec_need_root
ec_load_settings
pixel="${pixel:-0.073}"

# --- 1. JetPack / L4T version -----------------------------------------------------------
# /etc/nv_tegra_release: "# R36 (release), REVISION: 4.0, GCID: ..., BOARD: generic, ..."
# (read under --root too, so the detection can be tried on a copy of the file).
l4t=""
release_file="$(ec_path /etc/nv_tegra_release)"
if [[ -f "$release_file" ]]; then
    l4t="$(sed -n 's/^# R\([0-9]*\) (release), REVISION: \([0-9.]*\).*/\1.\2/p' "$release_file" |
        head -n 1)"
fi
if [[ -z "$l4t" ]] && ec_live && command -v dpkg-query >/dev/null; then
    l4t="$(dpkg-query -W -f='${Version}' nvidia-l4t-core 2>/dev/null | cut -d- -f1 || true)"
fi
major="${l4t%%.*}"
case "$major" in
    36) jetpack=6 ;;
    35) jetpack=5 ;;
    32) jetpack=4 ;;
    *) jetpack="" ;;
esac
if [[ -z "$jetpack" ]]; then
    if ec_live && [[ "$force" -eq 0 ]]; then
        ec_die "no JetPack found (no /etc/nv_tegra_release, no nvidia-l4t-core package);" \
            "use --force to go on anyway, or --dry-run to see what would be done"
    fi
    ec_warn "L4T version unknown; assuming JetPack 6"
    jetpack=6
else
    ec_log "L4T R$l4t: JetPack $jetpack"
fi
if [[ "$jetpack" == 4 ]]; then
    ec_die "JetPack 4 (L4T R32: Jetson Nano, TX2) has Python 3.6 and no supported ONNX" \
        "Runtime; edgecells needs JetPack 5 or 6. On a Nano, run the Raspberry Pi setup" \
        "steps by hand with the litert backend, or upgrade the module"
fi
if [[ -z "$ort_index" && -z "$ort_wheel" ]]; then
    if [[ "$jetpack" == 6 ]]; then
        # L4T R36.4+ (JetPack 6.1/6.2) ships CUDA 12.6; R36.2/36.3 (JetPack 6.0) CUDA 12.2.
        minor="$(cut -d. -f2 <<<"$l4t.0")"
        if [[ "${minor:-4}" -ge 4 ]]; then cuda=cu126; else cuda=cu122; fi
        ort_index="https://pypi.jetson-ai-lab.io/jp6/$cuda"
    else
        ec_die "JetPack 5: give the onnxruntime-gpu wheel for your Python with --ort-wheel" \
            "(download it from https://elinux.org/Jetson_Zoo#ONNX_Runtime)"
    fi
fi

# --- 2. Python >= 3.10 ------------------------------------------------------------------
if ec_live; then
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null ||
        ec_die "$python is $("$python" --version 2>&1); edgecells needs Python >= 3.10." \
            "JetPack 6 has it; on JetPack 5 install python3.10 and pass --python python3.10" \
            "with a matching --ort-wheel"
fi

# --- 3. system packages: TensorRT (trtexec, Python module), GStreamer tools ---------------
ec_apt_install python3-venv python3-pip libnvinfer-bin python3-libnvinfer \
    gstreamer1.0-tools
ec_ensure_user "$EC_USER" video render
ec_folders
ec_firmware_files
ec_install_content "$EC_PREFIX/firmware/build-trt-engine.sh" 0755 \
    <"$EC_FIRMWARE_DIR/jetson/build-trt-engine.sh"
ec_symlink /usr/local/sbin/edgecells-build-trt-engine "$EC_PREFIX/firmware/build-trt-engine.sh"

# --- 4. Python: venv (sees TensorRT and JetPack's OpenCV), ONNX Runtime GPU, edgecells -----
ec_venv "$python"
have_ort_gpu=0
if ec_live && "$EC_VENV/bin/python" -c 'import onnxruntime as o, sys
sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null; then
    have_ort_gpu=1
    ec_log "onnxruntime with CUDA already installed"
fi
if [[ "$have_ort_gpu" -eq 0 ]]; then
    if [[ -n "$ort_wheel" ]]; then
        ec_run "$EC_VENV/bin/python" -m pip install --quiet \
            --constraint "$EC_PREFIX/firmware/config/constraints.txt" "$ort_wheel"
    else
        ec_run "$EC_VENV/bin/python" -m pip install --quiet \
            --constraint "$EC_PREFIX/firmware/config/constraints.txt" \
            --extra-index-url "$ort_index" onnxruntime-gpu
    fi
fi
# cuda-python: device buffers for the TensorRT engine backend (edge/backends/tensorrt.py),
# the major version matching JetPack's CUDA (JetPack 6: CUDA 12; JetPack 5: CUDA 11.4).
if [[ "$jetpack" == 6 ]]; then cuda_python="cuda-python>=12,<13"; else cuda_python="cuda-python>=11.4,<12"; fi
ec_run "$EC_VENV/bin/python" -m pip install --quiet \
    --constraint "$EC_PREFIX/firmware/config/constraints.txt" "$cuda_python"
# No "onnx" extra here: it would pull the CPU onnxruntime wheel over the GPU one.
ec_pip_install "$package" ""
# JetPack's OpenCV is built with GStreamer (needed by gst: sources); the PyPI wheel is not.
# When the system one has it, remove the wheel from the venv so the system cv2 is used.
if ec_live; then
    if /usr/bin/python3 -c 'import cv2, re, sys
sys.exit(not re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()))' 2>/dev/null; then
        if "$EC_VENV/bin/python" -m pip show --quiet opencv-python-headless >/dev/null 2>&1; then
            ec_run "$EC_VENV/bin/python" -m pip uninstall --quiet -y opencv-python-headless
        fi
    else
        ec_warn "the system OpenCV has no GStreamer: gst: sources (the CSI camera) will not" \
            "open; install JetPack's OpenCV (sudo apt-get install nvidia-opencv) and re-run"
    fi
else
    printf 'would run: pip uninstall opencv-python-headless (if the system cv2 has GStreamer)\n'
    EC_PLANNED=$((EC_PLANNED + 1))
fi

# --- 5. configuration, units, first bundle ----------------------------------------------
ec_config "$source_uri" "$backend" "$threads" "$pixel"
ec_units "video render" "$mode"
ec_first_bundle

# --- 6. the camera ----------------------------------------------------------------------
if [[ "$camera_check" -eq 1 && "$source_uri" == gst:*nvarguscamerasrc* ]]; then
    if ec_live; then
        if timeout 20 gst-launch-1.0 -q nvarguscamerasrc num-buffers=5 ! fakesink \
            >/dev/null 2>&1; then
            ec_log "CSI camera delivers frames (nvarguscamerasrc)"
        else
            ec_warn "the CSI camera did not deliver frames (gst-launch-1.0 nvarguscamerasrc" \
                "num-buffers=5 ! fakesink). Check the ribbon cable and that" \
                "'sudo systemctl restart nvargus-daemon' helps; then re-run"
        fi
    else
        printf 'would run: gst-launch-1.0 nvarguscamerasrc num-buffers=5 ! fakesink\n'
        EC_PLANNED=$((EC_PLANNED + 1))
    fi
fi

# --- 7. services ------------------------------------------------------------------------
ec_services "$mode" "$start"

ec_summary
ec_log "optional: build a TensorRT engine for the current bundle:" \
    "sudo edgecells-build-trt-engine $EC_DATA_DIR/bundles/current"
ec_log "next: run 'edgecells doctor --config $EC_CONFIG_DIR/config.toml'; logs:" \
    "'journalctl -u edgecells-screen -f'"
