#!/usr/bin/env bash
# Build a TensorRT engine for a bundle's ONNX model on this Jetson, with trtexec.
#
#   sudo build-trt-engine.sh [BUNDLE] [--precision auto|int8|fp16] [--trtexec PATH]
#                            [--python PATH] [--root DIR] [--dry-run]
#
# BUNDLE defaults to the installed current bundle. INT8 (auto on Xavier and Orin) builds
# the bundle's ONNX QDQ int8 model: TensorRT reads the quantization scales from its Q/DQ
# nodes, no calibration needed. FP16 (auto on Jetson Nano and TX2, which have no INT8)
# builds the bundle's float32 ONNX model. The engine is written next to the model, as
# BUNDLE/trt/<model id>.<precision>.engine, with BUNDLE/trt/engine.json recording what it
# was built from (model file and SHA-256, precision, device, L4T and TensorRT versions).
# Neither is listed in manifest.json, so the bundle's hashes still verify; the runtime
# uses the engine only when engine.json matches the model and this device. An engine
# belongs to one device model and TensorRT version: rebuild after a JetPack upgrade or a
# bundle update.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
lib="$here/../lib"
[[ -f "$lib/common.sh" ]] || lib="$here/lib" # installed copy: PREFIX/firmware/
# shellcheck source=../lib/common.sh
. "$lib/common.sh"
EC_TAG=edgecells-trt
defaults="$lib/../config/defaults.env"

ec_parse_common "$@"
set -- "${EC_ARGS[@]+"${EC_ARGS[@]}"}"

bundle=""
precision=auto
trtexec=""
python=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --precision) precision="${2:?--precision needs auto, int8 or fp16}"; shift 2 ;;
        --trtexec) trtexec="${2:?--trtexec needs a path}"; shift 2 ;;
        --python) python="${2:?--python needs a path}"; shift 2 ;;
        -h | --help) sed -n '2,19p' "${BASH_SOURCE[0]}"; exit 0 ;;
        -*) ec_die "unknown option $1 (see --help)" ;;
        *) bundle="$1"; shift ;;
    esac
done
case "$precision" in auto | int8 | fp16) ;; *) ec_die "--precision $precision: use auto, int8 or fp16" ;; esac

# shellcheck source=../config/defaults.env
. "$defaults"
if [[ -f "$(ec_path /etc/edgecells/deploy.env)" ]]; then
    # shellcheck disable=SC1090
    . "$(ec_path /etc/edgecells/deploy.env)"
fi
bundle="${bundle:-$(ec_path "$EDGECELLS_DATA/bundles/current")}"
[[ -f "$bundle/manifest.json" ]] || ec_die "$bundle: no manifest.json (not a model bundle)"
bundle="$(cd "$bundle" && pwd -P)" # the real folder, not the `current` link
if [[ -z "$python" ]]; then
    python="$EDGECELLS_PREFIX/venv/bin/python"
    [[ -x "$python" ]] || python="$(command -v python3)"
fi

# --- the device -------------------------------------------------------------------------
model_file="$(ec_path /proc/device-tree/model)"
device="$(tr -d '\0' <"$model_file" 2>/dev/null || true)"
device="${device:-unknown}"
l4t="$(sed -n 's/^# R\([0-9]*\) (release), REVISION: \([0-9.]*\).*/\1.\2/p' \
    "$(ec_path /etc/nv_tegra_release)" 2>/dev/null | head -n 1 || true)"
if [[ "$precision" == auto ]]; then
    case "$device" in
        *"Jetson Nano"* | *"Jetson TX2"* | *"Jetson TX1"*) precision=fp16 ;;
        *) precision=int8 ;;
    esac
    ec_log "device: $device -> $precision"
fi
want_precision=int8
if [[ "$precision" == fp16 ]]; then want_precision=float32; fi

# --- the model: manifest entry and its input tensor name ---------------------------------
info="$("$python" - "$bundle" "$want_precision" <<'PY'
import json, sys
from pathlib import Path
root, want = Path(sys.argv[1]), sys.argv[2]
m = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
models = [e for e in m.get("models", []) if e.get("format") == "onnx" and e.get("precision") == want]
if not models:
    have = sorted(e.get("id", "?") for e in m.get("models", []))
    sys.exit(f"error: {root}: no {want} ONNX model in the bundle (it has: {', '.join(have)})")
e = models[0]
name = ""
try:
    import onnxruntime as ort
    name = ort.InferenceSession(str(root / e["path"]), providers=["CPUExecutionProvider"]).get_inputs()[0].name
except Exception:
    pass
shape = e["input"]["shape"]
print(e["id"], e["path"], e["sha256"], name or "-", "x".join(str(d) for d in shape[1:]))
PY
)" || ec_die "cannot read the ONNX model of $bundle"
read -r model_id model_path model_sha input_name dims <<<"$info"
if [[ "$input_name" == "-" ]]; then
    ec_die "cannot read the input name of $bundle/$model_path (onnxruntime missing in $python?)"
fi

engine_rel="trt/$model_id.$precision.engine"
engine="$bundle/$engine_rel"
args=(
    "--onnx=$bundle/$model_path"
    "--saveEngine=$engine.tmp"
    "--minShapes=$input_name:${TRT_MIN_BATCH}x$dims"
    "--optShapes=$input_name:${TRT_OPT_BATCH}x$dims"
    "--maxShapes=$input_name:${TRT_MAX_BATCH}x$dims"
    "--fp16"
)
if [[ "$precision" == int8 ]]; then args+=("--int8"); fi

if [[ -z "$trtexec" ]]; then
    trtexec="$(command -v trtexec || true)"
    [[ -n "$trtexec" ]] || trtexec=/usr/src/tensorrt/bin/trtexec
fi
if ! ec_live; then
    printf 'would run: %s %s\n' "$trtexec" "${args[*]}"
    printf 'would write: %s and %s/trt/engine.json\n' "$engine" "$bundle"
    exit 0
fi
ec_need_root_for() { [[ -w "$bundle" ]] || ec_die "$bundle: not writable (run with sudo)"; }
ec_need_root_for
[[ -x "$trtexec" ]] || ec_die "trtexec not found (sudo apt-get install libnvinfer-bin)"

mkdir -p "$bundle/trt"
log="$bundle/trt/trtexec.log"
ec_log "building $engine_rel from $model_path ($precision); this takes minutes"
if ! "$trtexec" "${args[@]}" >"$log" 2>&1; then
    rm -f "$engine.tmp"
    tail -n 20 "$log" >&2
    ec_die "trtexec failed (full log: $log)"
fi
[[ -s "$engine.tmp" ]] || ec_die "trtexec wrote no engine (log: $log)"
trt_version="$(sed -n 's/.*TensorRT version: \([0-9.]*\).*/\1/p' "$log" | head -n 1)"
if [[ -z "$trt_version" ]]; then
    trt_version="$(sed -n 's/.*\[TensorRT v\([0-9]*\)\].*/\1/p' "$log" | head -n 1)"
fi
mv -f "$engine.tmp" "$engine"

ENGINE_REL="$engine_rel" MODEL_ID="$model_id" MODEL_PATH="$model_path" \
    MODEL_SHA="$model_sha" PRECISION="$precision" INPUT_NAME="$input_name" \
    BATCH="$TRT_MIN_BATCH $TRT_OPT_BATCH $TRT_MAX_BATCH" DEVICE="$device" L4T="$l4t" \
    TRT_VERSION="$trt_version" "$python" - "$bundle" <<'PY'
import hashlib, json, os, sys, tempfile
from datetime import datetime, timezone
root, env = sys.argv[1], os.environ
engine = os.path.join(root, env["ENGINE_REL"])
h = hashlib.sha256()
with open(engine, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
note = {
    "schema": "edgecells.trt-engine/1",
    "engine": env["ENGINE_REL"],
    "engine_sha256": h.hexdigest(),
    "engine_bytes": os.path.getsize(engine),
    "model_id": env["MODEL_ID"],
    "model_path": env["MODEL_PATH"],
    "model_sha256": env["MODEL_SHA"],
    "precision": env["PRECISION"],
    "input_name": env["INPUT_NAME"],
    "batch": [int(b) for b in env["BATCH"].split()],
    "device": env["DEVICE"],
    "l4t": env["L4T"],
    "tensorrt": env["TRT_VERSION"],
    "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
}
fd, tmp = tempfile.mkstemp(dir=os.path.join(root, "trt"), prefix=".engine.")
with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(note, f, indent=2)
    f.write("\n")
os.chmod(tmp, 0o644)
os.replace(tmp, os.path.join(root, "trt", "engine.json"))
PY
chmod a+rX -R "$bundle/trt"
ec_log "engine ready: $engine (recorded in $bundle/trt/engine.json)"
ec_log "restart the service to use it: sudo systemctl restart edgecells-screen"
