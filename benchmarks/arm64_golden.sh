#!/usr/bin/env bash
# Is the integer Reinhard stain normalizer bit-exact on ARM? Runs it on emulated aarch64
# (qemu user mode, an arm64 Debian sysroot) and compares the SHA-256 of every output with
# the same outputs computed here on x86, with both kernels (numpy and numba).
#
#   bash benchmarks/arm64_golden.sh                 # golden PNGs + 20 BCCD frames + 50 PBC crops
#   bash benchmarks/arm64_golden.sh --golden-only --cpus default --arm-runs debian-numpy,numba
#                                                   # what tests/test_arm64_golden.py runs
#   bash benchmarks/arm64_golden.sh --setup-only    # build the cache, compare nothing
#
# Options:
#   --cpus LIST      qemu CPU models, comma-separated (default: default,cortex-a72,cortex-a76;
#                    "default" is qemu's own default, "max"; cortex-a72 = Pi 4, cortex-a76 = Pi 5)
#   --golden-only    only tests/golden's PNGs and the colour sweep (no ../shared/data sample)
#   --bccd N --pbc N how many BCCD frames / PBC crops to sample (default 20 / 50)
#   --data DIR       the shared data folder (default: ../shared/data from the repo root)
#   --arm-runs LIST  which aarch64 runs per CPU model (default: debian-numpy,numpy,numba):
#                    Debian's arm64 numpy with the numpy kernel, and the PyPI aarch64 wheels
#                    of this side's numpy/numba versions with the numpy and numba kernels
#   --offline        download nothing; exit 4 if the cache is incomplete
#   --setup-only     build the cache and stop
#   --work DIR       keep the decoded inputs and hash files there (default: a temp dir)
#
# The cache (${EDGECELLS_ARM64_CACHE:-${XDG_CACHE_HOME:-~/.cache}/edgecells/arm64-sysroot})
# holds a private apt state (this host's apt sources, arm64 package lists), the .deb files,
# the sysroot they are extracted into with `dpkg -x`, and numpy/numba/llvmlite aarch64 wheels
# of the versions installed here. Nothing is installed system-wide and no root is needed:
# qemu-aarch64-static is used from PATH when there (apt-get install qemu-user-static), or
# else extracted from the qemu-user-static package into the cache. After the first run
# everything is offline, unless numpy/numba/llvmlite here change version (new wheels).
# Needs: apt-get and dpkg-deb (a Debian-family host whose apt sources carry arm64, e.g.
# Debian bookworm), and a Python (${PYTHON:-python3}) with this checkout's dependencies.
#
# Exit status: 0 every output identical, 1 some output differs, 2 usage, 3 setup or a run
# failed, 4 --offline and the cache is incomplete.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
CACHE=${EDGECELLS_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgecells/arm64-sysroot}
PYTHON=${PYTHON:-python3}
HELPER="$HERE/arm64_golden.py"

CPUS="default,cortex-a72,cortex-a76"
GOLDEN_ONLY=0
N_BCCD=20
N_PBC=50
DATA="$ROOT/../shared/data"
ARM_RUNS="debian-numpy,numpy,numba"
OFFLINE=0
SETUP_ONLY=0
WORK=""

# arm64 Debian packages of the sysroot: the interpreter, Debian's numpy, and the libraries
# they load (apt-cache depends; the recursive closure adds perl, dpkg and alternatives).
ARM_PACKAGES=(
  python3.11 python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3-numpy
  libc6 libgcc-s1 libstdc++6 libexpat1 zlib1g libffi8 libbz2-1.0 liblzma5 libzstd1 libssl3
  libsqlite3-0 libuuid1 libcrypt1 libtinfo6 libncursesw6 libreadline8 libdb5.3 libgdbm6
  libnsl2 libtirpc3 libblas3 liblapack3 libgfortran5
)

die() {
  echo "arm64_golden: $*" >&2
  exit 3
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpus) CPUS=${2:?--cpus needs a list}; shift 2 ;;
    --golden-only) GOLDEN_ONLY=1; shift ;;
    --bccd) N_BCCD=${2:?--bccd needs a number}; shift 2 ;;
    --pbc) N_PBC=${2:?--pbc needs a number}; shift 2 ;;
    --data) DATA=${2:?--data needs a folder}; shift 2 ;;
    --arm-runs) ARM_RUNS=${2:?--arm-runs needs a list}; shift 2 ;;
    --offline) OFFLINE=1; shift ;;
    --setup-only) SETUP_ONLY=1; shift ;;
    --work) WORK=${2:?--work needs a folder}; shift 2 ;;
    -h | --help) usage ;;
    *) echo "arm64_golden: unknown option $1" >&2; usage ;;
  esac
done

IFS=, read -r -a cpu_list <<<"$CPUS"
IFS=, read -r -a arm_runs <<<"$ARM_RUNS"
for kind in "${arm_runs[@]}"; do
  [[ $kind =~ ^(debian-numpy|numpy|numba)$ ]] || { echo "arm64_golden: unknown run $kind" >&2; usage; }
done

SYSROOT="$CACHE/root"
APT_DIR="$CACHE/apt"
mkdir -p "$CACHE"

# A private apt state: this host's sources, but arm64 (and host) package lists of our own,
# so nothing changes in the system's dpkg or apt configuration.
HOST_ARCH=$(dpkg --print-architecture 2>/dev/null || echo amd64)
APT_OPTS=(
  -o "Dir::State=$APT_DIR/state" -o "Dir::State::status=$APT_DIR/status"
  -o "Dir::Cache=$APT_DIR/cache" -o "APT::Architecture=$HOST_ARCH"
  -o "APT::Architectures::=$HOST_ARCH" -o "APT::Architectures::=arm64"
  -o "Debug::NoLocking=1" -o "APT::Sandbox::User=$(id -un)" -q
)

need_network() {
  if [[ $OFFLINE == 1 ]]; then
    echo "arm64_golden: the cache at $CACHE lacks $1 and --offline forbids downloading" \
      "(run once without --offline)" >&2
    exit 4
  fi
}

apt_lists() {
  [[ -f "$APT_DIR/lists.ok" ]] && return 0
  need_network "arm64 package lists"
  command -v apt-get >/dev/null || die "apt-get is needed to fetch the arm64 packages"
  mkdir -p "$APT_DIR/state/lists/partial" "$APT_DIR/cache/archives/partial"
  touch "$APT_DIR/status"
  echo "arm64_golden: apt-get update (private lists in $APT_DIR)" >&2
  apt-get "${APT_OPTS[@]}" update >&2 || die "apt-get update failed"
  apt-cache "${APT_OPTS[@]}" show python3.11:arm64 >/dev/null 2>&1 ||
    die "this host's apt sources have no arm64 packages (a Debian bookworm host has them)"
  touch "$APT_DIR/lists.ok"
}

build_sysroot() {
  [[ -f "$SYSROOT/.complete" ]] && return 0
  mkdir -p "$CACHE/debs"
  if [[ ! -f "$CACHE/debs/.complete" ]]; then
    apt_lists
    need_network "the arm64 .deb files"
    echo "arm64_golden: downloading ${#ARM_PACKAGES[@]} arm64 packages" >&2
    (cd "$CACHE/debs" && apt-get "${APT_OPTS[@]}" download "${ARM_PACKAGES[@]/%/:arm64}" >&2) ||
      die "apt-get download of the arm64 packages failed"
    touch "$CACHE/debs/.complete"
  fi
  rm -rf "$SYSROOT.partial"
  mkdir -p "$SYSROOT.partial"
  local deb
  for deb in "$CACHE"/debs/*.deb; do
    dpkg-deb -x "$deb" "$SYSROOT.partial" || die "cannot extract $deb"
  done
  # What update-alternatives would do on a real system: libblas.so.3 and liblapack.so.3.
  local lib="$SYSROOT.partial/usr/lib/aarch64-linux-gnu"
  ln -sf blas/libblas.so.3 "$lib/libblas.so.3"
  ln -sf lapack/liblapack.so.3 "$lib/liblapack.so.3"
  (cd "$CACHE/debs" && printf '%s\n' *.deb) >"$SYSROOT.partial/.packages"
  touch "$SYSROOT.partial/.complete"
  rm -rf "$SYSROOT"
  mv "$SYSROOT.partial" "$SYSROOT"
}

find_qemu() {
  if command -v qemu-aarch64-static >/dev/null; then
    QEMU=$(command -v qemu-aarch64-static)
    return 0
  fi
  QEMU="$CACHE/qemu/usr/bin/qemu-aarch64-static"
  [[ -x "$QEMU" ]] && return 0
  apt_lists
  need_network "qemu-user-static"
  echo "arm64_golden: qemu-aarch64-static is not on PATH; extracting qemu-user-static into the cache" >&2
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get "${APT_OPTS[@]}" download "qemu-user-static:$HOST_ARCH" >&2) ||
    die "cannot download qemu-user-static (or: apt-get install qemu-user-static)"
  dpkg-deb -x "$tmp"/qemu-user-static_*.deb "$tmp/x" || die "cannot extract qemu-user-static"
  mkdir -p "$(dirname "$QEMU")"
  mv "$tmp/x/usr/bin/qemu-aarch64-static" "$QEMU"  # the one binary of ~50 we need
  rm -rf "$tmp"
  [[ -x "$QEMU" ]] || die "qemu-user-static has no qemu-aarch64-static"
}

# numpy, numba and llvmlite for aarch64, the versions installed on this side (PyPI wheels).
pypi_site() {
  local versions
  versions=$("$PYTHON" -c 'import numpy, numba, llvmlite
print(f"numpy=={numpy.__version__} numba=={numba.__version__} llvmlite=={llvmlite.__version__}")') ||
    die "$PYTHON cannot import numpy, numba and llvmlite"
  SITE="$CACHE/site/${versions// /_}"
  SITE=${SITE//==/-}
  [[ -f "$SITE/.complete" ]] && return 0
  local pip_platform=(
    --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311
    --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64
    --platform manylinux_2_28_aarch64
  )
  # shellcheck disable=SC2086  # $versions is three requirement words
  if ! "$PYTHON" -m pip download --no-deps "${pip_platform[@]}" --no-index \
    --find-links "$CACHE/wheels" -d "$CACHE/wheels" $versions >/dev/null 2>&1; then
    need_network "aarch64 wheels of $versions"
    echo "arm64_golden: downloading aarch64 wheels: $versions" >&2
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download --no-deps "${pip_platform[@]}" -d "$CACHE/wheels" $versions >&2 ||
      die "pip download of the aarch64 wheels failed"
  fi
  rm -rf "$SITE.partial"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install --no-deps --no-index --find-links "$CACHE/wheels" \
    "${pip_platform[@]}" --target "$SITE.partial" $versions >&2 ||
    die "cannot unpack the aarch64 wheels into $SITE"
  touch "$SITE.partial/.complete"
  rm -rf "$SITE"
  mv "$SITE.partial" "$SITE"
}

build_sysroot
find_qemu
pypi_site
ARM_PY="$SYSROOT/usr/bin/python3.11"
[[ -x "$ARM_PY" ]] || die "$ARM_PY is missing (remove $CACHE and run again)"
QEMU_VERSION=$("$QEMU" --version | head -n1)
echo "arm64_golden: $QEMU_VERSION; sysroot $SYSROOT" >&2
if [[ $SETUP_ONLY == 1 ]]; then
  echo "arm64_golden: cache ready" >&2
  exit 0
fi

if [[ -z "$WORK" ]]; then
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK/hashes"
rm -f "$WORK"/hashes/*.json

prepare=("$PYTHON" "$HELPER" prepare "$WORK/inputs")
if [[ $GOLDEN_ONLY == 1 ]]; then
  prepare+=(--golden-only)
else
  prepare+=(--data "$DATA" --bccd "$N_BCCD" --pbc "$N_PBC")
fi
"${prepare[@]}" >&2 || exit 3

# One run: a label, the kernel, then the command that runs a Python script (the helper,
# which writes $WORK/hashes/<label>.json).
run() {
  local label=$1 kernel=$2
  shift 2
  local start=$SECONDS
  NUMBA_CACHE_DIR="$WORK/numba-cache/$label" "$@" "$HELPER" hashes "$WORK/inputs" \
    --kernel "$kernel" --label "$label" --out "$WORK/hashes/$label.json" >&2 ||
    { echo "arm64_golden: run $label failed" >&2; exit 3; }
  echo "arm64_golden: $label done in $((SECONDS - start)) s" >&2
  RUNS+=("$WORK/hashes/$label.json")
}

RUNS=()

HOST=$(uname -m)
run "$HOST-numpy" numpy "$PYTHON"
run "$HOST-numba" numba "$PYTHON"

for cpu in "${cpu_list[@]}"; do
  arm=(env PYTHONPYCACHEPREFIX="$CACHE/pycache")
  qemu=("$QEMU" -L "$SYSROOT")
  if [[ $cpu != default ]]; then
    qemu+=(-cpu "$cpu")
    # numba compiles for the CPU that LLVM detects, and under qemu-user LLVM cannot see
    # the emulated one: name it, as LLVM detects it on the real board.
    arm+=("NUMBA_CPU_NAME=$cpu")
  fi
  for kind in "${arm_runs[@]}"; do
    case "$kind" in
      debian-numpy) site="$SYSROOT/usr/lib/python3/dist-packages" kernel=numpy ;;
      numpy | numba) site="$SITE" kernel=$kind ;;
    esac
    run "aarch64-$cpu-$kind" "$kernel" "${arm[@]}" PYTHONPATH="$site" "${qemu[@]}" "$ARM_PY" -S
  done
done

"$PYTHON" "$HELPER" compare --qemu "$QEMU_VERSION" "${RUNS[@]}"
