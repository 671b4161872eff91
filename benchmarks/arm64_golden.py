"""Hash every output of the integer Reinhard normalizer, to compare machines bit for bit.

The helper of ``benchmarks/arm64_golden.sh``, which runs ``hashes`` here (x86) and on an
emulated aarch64 Python, then ``compare``::

    python benchmarks/arm64_golden.py prepare WORK/inputs [--golden-only] [--data DIR] ...
    python benchmarks/arm64_golden.py hashes WORK/inputs --kernel numpy --out x86.json
    python benchmarks/arm64_golden.py compare x86.json arm.json ...

``prepare`` decodes the inputs to ``.npy`` with OpenCV here, so the other side needs
only numpy (and numba for ``--kernel numba``): the normalizer is compared, not JPEG
decoders. ``hashes`` imports edgecells from this checkout (installed or not; where OpenCV
is missing a stand-in module satisfies ``edge/imageio.py``'s import) and records, per
image: its pixels, the L* statistics histograms (every pixel, every 4th), the frame
statistics, the transfer parameters, the whole normalized image and a crop normalized
with the frame's statistics; and targets fitted on each group of images. It also runs
``tests/golden/generate.py``'s ``compute`` on the decoded PNGs and checks the result
against ``stain_golden.json``. ``compare`` prints one line per run and the verdict, and
exits 1 when any output differs from the first file's.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "tests" / "golden"
CROP_FRACTION = 2  # crops are the central 1/2 x 1/2 of each image


def _import_edgecells() -> Any:
    """Import edgecells from this checkout, whether or not it is installed."""
    sys.path.insert(0, str(ROOT))
    try:
        import cv2  # noqa: F401
    except ImportError:  # the emulated side: decoding was done on the other one
        stub = types.ModuleType("cv2")
        stub.__doc__ = "stand-in: arm64_golden.py decodes images before emulation"
        sys.modules["cv2"] = stub
    import edgecells

    # setup.py maps edgecells.edge -> edge/: do the same when edgecells is not installed
    edgecells.__path__.append(str(ROOT))
    import edgecells.edge.stain as stain

    if Path(stain.__file__).resolve() != ROOT / "edge" / "stain.py":
        raise SystemExit(f"arm64_golden: imported {stain.__file__}, not this checkout's")
    sys.path.insert(0, str(GOLDEN_DIR))
    return stain


def sha(a: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- prepare


def _sample_bccd(data: Path, n: int) -> list[Path]:
    frames = sorted((data / "bccd" / "BCCD" / "JPEGImages").glob("*.jpg"))
    if not frames or n <= 0:
        return []
    step = max(len(frames) // n, 1)
    return frames[::step][:n]


def _sample_pbc(data: Path, n: int) -> list[Path]:
    """``n`` test-split crops, round-robin over the classes (sorted: deterministic)."""
    splits = data / "pbc" / "splits.csv"
    if not splits.exists() or n <= 0:
        return []
    by_class: dict[str, list[str]] = {}
    with splits.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] == "test":
                by_class.setdefault(row["label"], []).append(row["path"])
    queues = [sorted(v) for _, v in sorted(by_class.items())]
    picked: list[Path] = []
    i = 0
    while len(picked) < n and any(i < len(q) for q in queues):
        picked += [data / "pbc" / q[i] for q in queues if i < len(q)]
        i += 1
    return picked[:n]


def prepare(out: Path, data: Path | None, n_bccd: int, n_pbc: int) -> dict[str, Any]:
    """Decode the golden PNGs (and a sample of real frames) to ``out/*.npy``."""
    _import_edgecells()
    import generate as golden

    from edgecells.edge.imageio import read_image

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.npy"):
        old.unlink()
    sources: list[tuple[str, Path]] = [("golden", GOLDEN_DIR / n) for n in golden.INPUTS]
    if data is not None:
        sources += [("bccd", p) for p in _sample_bccd(data, n_bccd)]
        sources += [("pbc", p) for p in _sample_pbc(data, n_pbc)]
    images = []
    for i, (group, path) in enumerate(sources):
        name = f"{group}/{path.name}"
        file = f"{i:04d}_{group}_{path.stem}.npy"
        np.save(out / file, read_image(path), allow_pickle=False)
        images.append({"name": name, "group": group, "file": file})
    manifest = {"images": images}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    n = {g: sum(1 for im in images if im["group"] == g) for g in ("golden", "bccd", "pbc")}
    print(
        f"arm64_golden: decoded {len(images)} images to {out} "
        f"({n['golden']} golden PNGs, {n['bccd']} BCCD frames, {n['pbc']} PBC crops)",
        file=sys.stderr,
    )
    return manifest


# --------------------------------------------------------------------------- hashes


def _stats_array(st: Any) -> np.ndarray:
    return np.array(
        [
            int(st.ok),
            st.n_pixels,
            st.n_stained,
            *st.mean_q10,
            *st.std_q10,
            st.threshold_q10,
            st.stride,
            *(st.sums or (0,) * 7),
        ],
        dtype=np.int64,
    )


def _numpy_simd() -> list[str]:
    """The SIMD extensions numpy found on this CPU (and so may dispatch to)."""
    try:
        from numpy._core import _multiarray_umath as mu  # numpy >= 2
    except ImportError:
        from numpy.core import _multiarray_umath as mu  # numpy 1.x
    return sorted(k for k, v in mu.__cpu_features__.items() if v)


def _versions(kernel: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_path": str(Path(np.__file__).parent),
        "kernel": kernel,
        "numpy_simd": _numpy_simd(),
    }
    if kernel == "numba":
        import llvmlite
        import llvmlite.binding as llvm
        import numba

        meta["numba"] = numba.__version__
        meta["llvmlite"] = llvmlite.__version__
        meta["llvm"] = ".".join(map(str, llvm.llvm_version_info))
        meta["llvm_host_cpu"] = llvm.get_host_cpu_name()
        meta["numba_cpu"] = numba.config.CPU_NAME or meta["llvm_host_cpu"]
        meta["numba_cpu_features"] = (
            numba.config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()
        )
    return meta


def hashes(inputs: Path, kernel: str, label: str) -> dict[str, Any]:
    """SHA-256 of every output of the normalizer on the decoded inputs."""
    t0, c0 = time.perf_counter(), time.process_time()
    stain = _import_edgecells()
    import generate as golden

    from edgecells.edge import stain_kernels as K
    from edgecells.edge.reinhard_tables import load_tables

    if kernel not in K.KERNELS:
        raise SystemExit(f"arm64_golden: no {kernel} kernel here (have {', '.join(K.KERNELS)})")
    stats_fn, transform_fn = K.KERNELS[kernel]
    tables = load_tables()
    norm = stain.ReinhardNormalizer(golden.fixed_target(), kernel=kernel)
    manifest = json.loads((inputs / "manifest.json").read_text())
    images = {im["name"]: np.load(inputs / im["file"]) for im in manifest["images"]}
    groups: dict[str, list[str]] = {}
    for im in manifest["images"]:
        groups.setdefault(im["group"], []).append(im["name"])
    images["sweep"] = golden.sweep()
    out: dict[str, str] = {}
    for name, img in images.items():
        rgb = np.ascontiguousarray(img)
        out[f"{name}/input"] = sha(rgb)
        for stride in (1, 4):
            hist = stats_fn(rgb, stride, tables)
            st = stain.stats_from_hist(hist, norm.mask, stride)
            out[f"{name}/hist{stride}"] = sha(hist)
            out[f"{name}/stats{stride}"] = sha(_stats_array(st))
            if st.ok:
                out[f"{name}/params{stride}"] = sha(norm.params(st))
            if stride == 1:
                out[f"{name}/whole"] = sha(norm.normalize(rgb, stats=st).image)
            else:
                h, w = rgb.shape[:2]
                y, x = h // (2 * CROP_FRACTION), w // (2 * CROP_FRACTION)
                crop = rgb[y : y + h // CROP_FRACTION, x : x + w // CROP_FRACTION]
                out[f"{name}/crop"] = sha(norm.transform_crop(crop, st))
    for group, names in groups.items():
        fitted = stain.StainTarget.fit([images[n] for n in names], kernel=kernel)
        out[f"fit/{group}"] = sha(np.array([*fitted.mean_q10, *fitted.std_q10], dtype=np.int64))

    # the committed golden vectors, computed by generate.py itself from the decoded PNGs
    decoded = {Path(n).name: images[n] for n in groups.get("golden", [])}
    expected = json.loads((GOLDEN_DIR / "stain_golden.json").read_text())
    read_image = golden.read_image
    golden.read_image = lambda p: decoded[Path(p).name]
    try:
        golden_ok = golden.compute(kernel=kernel) == expected
    finally:
        golden.read_image = read_image
    meta = _versions(kernel)
    return {
        "label": label,
        "meta": meta,
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(time.process_time() - c0, 1),
        "golden_json": "match" if golden_ok else "MISMATCH",
        "hashes": out,
    }


# --------------------------------------------------------------------------- compare


def _describe(run: dict[str, Any]) -> str:
    m = run["meta"]
    parts = [f"python {m['python']}", f"numpy {m['numpy']}"]
    if m["kernel"] == "numba":
        parts.append(f"numba {m['numba']} (llvmlite {m['llvmlite']}, LLVM {m['llvm']})")
        feats = m["numba_cpu_features"] or "no features"
        if len(feats) > 60:  # x86 hosts list ~100 features
            feats = f"{feats.count('+')} host features"
        parts.append(f"compiled for {m['numba_cpu']} ({feats})")
    return f"{m['machine']}, {m['kernel']} kernel: {', '.join(parts)}"


def compare(runs: list[dict[str, Any]], qemu: str | None = None) -> tuple[int, list[str]]:
    """Compare every run with the first; returns (exit status, lines to print)."""
    ref = runs[0]["hashes"]
    lines = []
    differing: set[str] = set()
    bad_runs = 0
    first = None
    golden_bad = [r["label"] for r in runs if r["golden_json"] != "match"]
    for i, run in enumerate(runs):
        h = run["hashes"]
        diff = sorted(k for k in ref.keys() | h.keys() if ref.get(k) != h.get(k))
        if i == 0:
            state = f"{len(ref)} arrays (the reference)"
        elif diff:
            state = f"{len(diff)} of {len(ref)} arrays DIFFER (first: {diff[0]})"
            differing.update(diff)
            bad_runs += 1
            first = first or f"{diff[0]} in {run['label']}"
        else:
            state = f"{len(h)} arrays identical"
        lines.append(
            f"  {run['label']:<32} {state}; stain_golden.json {run['golden_json']}; "
            f"{run['seconds']} s (CPU {run.get('cpu_seconds', '?')} s); {_describe(run)}"
        )
    n_arm = sum(1 for r in runs if r["meta"]["machine"] == "aarch64")
    host = runs[0]["meta"]["machine"]
    how = f"{len(runs)} runs ({len(runs) - n_arm} native {host}, {n_arm} aarch64"
    how += f" under {qemu})" if qemu else ")"
    if differing or golden_bad or n_arm == 0:
        bits = []
        if differing:
            bits.append(f"{len(differing)} of {len(ref)} arrays differ in {bad_runs} of {how}")
            bits.append(f"first: {first}")
        if golden_bad:
            bits.append(f"stain_golden.json not reproduced by {', '.join(golden_bad)}")
        if n_arm == 0:
            bits.append("no aarch64 run to compare")
        lines.append("DIFFERENT: " + "; ".join(bits))
        return 1, lines
    lines.append(
        f"identical: {len(ref)} arrays in each of {how}, hash for hash; "
        f"stain_golden.json reproduced by every run"
    )
    return 0, lines


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="decode the inputs to .npy (needs OpenCV)")
    p.add_argument("out", type=Path)
    p.add_argument("--golden-only", action="store_true")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--bccd", type=int, default=20)
    p.add_argument("--pbc", type=int, default=50)
    h = sub.add_parser("hashes", help="hash every output on the decoded inputs")
    h.add_argument("inputs", type=Path)
    h.add_argument("--kernel", choices=("numpy", "numba"), default="numpy")
    h.add_argument("--label", default=None)
    h.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare", help="compare hash files with the first; exit 1 on a difference")
    c.add_argument("files", type=Path, nargs="+")
    c.add_argument("--qemu", default=None, help="the emulator's version line, for the verdict")
    args = ap.parse_args(argv)

    if args.cmd == "prepare":
        data = None
        if not args.golden_only:
            data = args.data if args.data.exists() else None
            if data is None:
                print(f"arm64_golden: {args.data} is absent: golden PNGs only", file=sys.stderr)
        prepare(args.out, data, args.bccd, args.pbc)
        return 0
    if args.cmd == "hashes":
        label = args.label or f"{platform.machine()}-{args.kernel}"
        result = hashes(args.inputs, args.kernel, label)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, args.out)
        return 0
    runs = [json.loads(f.read_text()) for f in args.files]
    status, lines = compare(runs, args.qemu.split(" (")[0] if args.qemu else None)
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
