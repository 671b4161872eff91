"""Fixed-point constants and lookup tables of the integer Reinhard normalizer.

Colour space: CIELAB with the D65 white of the sRGB primaries. Representations:

- linear light and the white-normalized tristimulus values X/Xn, Y/Yn, Z/Zn: Q16
  (65536 = 1.0);
- the CIELAB companding function f(t) = t^(1/3) (linear below (6/29)^3): Q16;
- L*, a*, b*: Q10 (1024 = one CIELAB unit);
- colour matrices: Q20, each row adjusted so that white maps exactly to white.

The tables are built once from float64 math by :func:`build_tables` and committed as
``data/reinhard_luts.npz``; the runtime loads the committed file and checks its
SHA-256, so the integer output does not depend on a platform's ``pow``. A test
rebuilds the tables and checks they match the committed file.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgecells.edge.errors import EdgecellsError

Q_LIN = 16  # linear light, X/Xn..., f(t)
Q_LAB = 10  # L*, a*, b*
Q_MAT = 20  # colour matrices
ONE_LIN = 1 << Q_LIN

# f(t) lookup domain for the inverse: f in [-0.25, 1.25] (Q16), so that transferred
# colours a little outside the gamut invert without wrapping; results are clipped later.
F_MIN = -(1 << Q_LIN) // 4
F_MAX = (1 << Q_LIN) * 5 // 4

# sRGB (IEC 61966-2-1) primaries -> XYZ, D65; rows divided by the white point (the row
# sums), then rounded to Q20 with each row's largest entry adjusted so rows sum to 2^20.
RGB_TO_XYZN_Q20 = np.array(
    [[455029, 394485, 199062], [223004, 749891, 75681], [18619, 114785, 915172]], dtype=np.int64
)
# Its inverse, rounded the same way: white (1, 1, 1) maps back to (1, 1, 1).
XYZN_TO_RGB_Q20 = np.array(
    [[3229567, -1611807, -569184], [-966010, 1967141, 47445], [55456, -213937, 1207057]],
    dtype=np.int64,
)

# Float64 versions of exactly the same matrices, for the reference implementation.
RGB_TO_XYZN = RGB_TO_XYZN_Q20.astype(np.float64) / (1 << Q_MAT)
XYZN_TO_RGB = XYZN_TO_RGB_Q20.astype(np.float64) / (1 << Q_MAT)

TABLES_PATH = Path(__file__).parent / "data" / "reinhard_luts.npz"
TABLES_SHA256 = "cfb00eb80766e7de8c011d08ac60499ced54c24e68f1a547a0564845fad99236"

_DELTA = 6.0 / 29.0


def srgb_to_linear(v: np.ndarray) -> np.ndarray:
    """sRGB companding inverse, v in [0, 1] (float64)."""
    v = np.asarray(v, dtype=np.float64)
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """sRGB companding, x in [0, 1] (float64)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(
        x <= 0.0031308, 12.92 * x, 1.055 * np.power(np.maximum(x, 0.0), 1 / 2.4) - 0.055
    )


def lab_f(t: np.ndarray) -> np.ndarray:
    """CIELAB f(t): cube root above (6/29)^3, linear below (float64)."""
    t = np.asarray(t, dtype=np.float64)
    return np.where(t > _DELTA**3, np.cbrt(t), t / (3 * _DELTA**2) + 4.0 / 29.0)


def lab_f_inv(f: np.ndarray) -> np.ndarray:
    """Inverse of :func:`lab_f` (float64); linear branch extends below zero."""
    f = np.asarray(f, dtype=np.float64)
    return np.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4.0 / 29.0))


def _round(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5)


def build_tables() -> dict[str, np.ndarray]:
    """Build the lookup tables from float64 math (run once; the result is committed)."""
    v = np.arange(256, dtype=np.float64) / 255.0
    lin = _round(srgb_to_linear(v) * ONE_LIN).astype(np.int32)
    t = np.arange(ONE_LIN + 1, dtype=np.float64) / ONE_LIN
    cbrt = _round(lab_f(t) * ONE_LIN).astype(np.int32)
    f = np.arange(F_MIN, F_MAX + 1, dtype=np.float64) / ONE_LIN
    finv = _round(lab_f_inv(f) * ONE_LIN).astype(np.int32)
    enc = _round(linear_to_srgb(t) * 255.0).astype(np.uint8)
    return {"lin": lin, "cbrt": cbrt, "finv": finv, "enc": enc}


def tables_digest(tables: dict[str, np.ndarray]) -> str:
    """SHA-256 over the tables' names, dtypes and bytes (independent of npz packing)."""
    h = hashlib.sha256()
    for name in ("lin", "cbrt", "finv", "enc"):
        arr = np.ascontiguousarray(tables[name])
        h.update(name.encode())
        h.update(str(arr.dtype).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


@lru_cache(maxsize=1)
def load_tables() -> dict[str, np.ndarray]:
    """The committed lookup tables, verified against :data:`TABLES_SHA256`."""
    try:
        with np.load(TABLES_PATH, allow_pickle=False) as z:
            tables = {k: np.ascontiguousarray(z[k]) for k in ("lin", "cbrt", "finv", "enc")}
    except (OSError, KeyError, ValueError) as exc:
        raise EdgecellsError(f"{TABLES_PATH}: stain lookup tables unreadable ({exc})") from None
    digest = tables_digest(tables)
    if digest != TABLES_SHA256:
        raise EdgecellsError(
            f"{TABLES_PATH}: stain lookup tables do not match their pinned SHA-256 "
            f"(got {digest[:12]}...); reinstall edgecells"
        )
    return tables


def write_tables(path: Path = TABLES_PATH) -> str:
    """Regenerate the committed tables file; returns its digest (maintainers only)."""
    tables = build_tables()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **tables)
    return tables_digest(tables)
