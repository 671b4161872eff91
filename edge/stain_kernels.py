"""Integer kernels of the fixed-point Reinhard normalizer.

Two implementations of exactly the same integer arithmetic:

- a compiled per-pixel loop (numba, ``nopython``), the one used by default: one pass
  for statistics, one fused pass for the transform. The compiled code is cached in the
  user's cache folder (``$NUMBA_CACHE_DIR`` if set, else ``numba/`` under
  :func:`~edgecells.edge.fileio.user_cache_dir`), never beside this file: the package
  must not write into its install folder. Where no cache folder is writable it compiles
  on first use in each process (about a second) and writes nothing;
- a pure-numpy vectorized version, slower, kept as the readable reference for the
  integer path and as the fallback when numba is not importable.

Both must give bit-identical results (tests check this, and the golden vectors hold
for both). All arithmetic is integer: int64 accumulators, Q16/Q10/Q20 fixed point
(see :mod:`edgecells.edge.reinhard_tables`), lookup tables for the non-linear parts.

Per pixel, forward (sRGB uint8 -> CIELAB Q10)::

    lin_c = LIN[v_c]                                        Q16 linear light
    t_i   = (sum_c M[i,c] * lin_c + 2^19) >> 20             Q16 X/Xn, Y/Yn, Z/Zn
    f_i   = CBRT[t_i]                                       Q16 f(t)
    L     = (116*fy - 16*2^16 + 32) >> 6                    Q10
    a     = (500*(fx - fy) + 32) >> 6,  b = (200*(fy - fz) + 32) >> 6

Transfer, per channel: ``v' = ((v - mu_s) * scale + 2^15) >> 16 + mu_t`` with
``scale = round(std_t / std_s * 2^16)``. Inverse: f from L', a', b' by rounded integer
division, clamped to the table domain, ``t = FINV[f]``, ``lin = Minv t`` (Q20 matrix,
clamped to [0, 1]), ``v = ENC[lin]``. Glass (L >= threshold) and near-black pixels
(L < dark) keep their input value; a band just under the threshold blends the two
with an 8-bit weight.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from edgecells.edge.fileio import user_cache_dir, writable_dir
from edgecells.edge.reinhard_tables import F_MAX, F_MIN, RGB_TO_XYZN_Q20, XYZN_TO_RGB_Q20

N_BINS = 512  # L* histogram bins of 0.25 L* units (Q10 >> 8); L* <= 100 fits in 401
BIN_SHIFT = 8
HIST_COLS = 8  # count, sum L, sum a, sum b, sum L^2, sum a^2, sum b^2, clipped count


def _numba_cache_dir() -> str | None:
    """Point numba's on-disk cache at a writable user folder, before numba is imported.

    ``$NUMBA_CACHE_DIR`` set by the user is kept. Without it numba would write
    ``*.nbi``/``*.nbc`` into ``edge/__pycache__`` of the install, which ``pip uninstall``
    leaves behind (a stale ``site-packages/edgecells/`` then shadows an editable install).
    Returns the folder, or None when none is writable (compile without caching)."""
    d = os.environ.get("NUMBA_CACHE_DIR") or str(user_cache_dir("numba"))
    if not writable_dir(Path(d)):
        return None
    os.environ["NUMBA_CACHE_DIR"] = d
    cfg = sys.modules.get("numba.core.config")
    if cfg is not None:  # numba already imported by someone else: its config read the env
        cfg.CACHE_DIR = d
    return d


NUMBA_CACHE_DIR = _numba_cache_dir()
_CACHE = NUMBA_CACHE_DIR is not None

try:  # numba is a core dependency, but the normalizer must still work without it
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None
    HAVE_NUMBA = False


# --------------------------------------------------------------------------- numpy


def _lab_np(img: np.ndarray, tables: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    lin = tables["lin"].astype(np.int64)
    cbrt = tables["cbrt"].astype(np.int64)
    m = RGB_TO_XYZN_Q20
    r = lin[img[..., 0]]
    g = lin[img[..., 1]]
    b = lin[img[..., 2]]
    t = [
        np.clip((m[i, 0] * r + m[i, 1] * g + m[i, 2] * b + (1 << 19)) >> 20, 0, 65536)
        for i in range(3)
    ]
    fx, fy, fz = (cbrt[ti] for ti in t)
    L = (116 * fy - 16 * 65536 + 32) >> 6
    A = (500 * (fx - fy) + 32) >> 6
    B = (200 * (fy - fz) + 32) >> 6
    return L, A, B


def stats_hist_np(img: np.ndarray, stride: int, tables: dict[str, np.ndarray]) -> np.ndarray:
    """Per-L*-bin sums over every ``stride``-th pixel in both directions (numpy)."""
    sub = img[::stride, ::stride]
    L, A, B = _lab_np(sub, tables)
    clipped = np.any(sub == 255, axis=-1).astype(np.int64)
    bins = np.clip(L >> BIN_SHIFT, 0, N_BINS - 1).ravel()
    hist = np.zeros((N_BINS, HIST_COLS), dtype=np.int64)
    L, A, B = L.ravel(), A.ravel(), B.ravel()
    cols = (np.ones_like(L), L, A, B, L * L, A * A, B * B, clipped.ravel())
    for j, v in enumerate(cols):
        np.add.at(hist[:, j], bins, v)
    return hist


def _div_round(x: np.ndarray, d: int) -> np.ndarray:
    return (2 * x + d) // (2 * d)


def transform_np(img: np.ndarray, params: np.ndarray, tables: dict[str, np.ndarray]) -> np.ndarray:
    """Fused transform (numpy). ``params``: int64[12] (see :func:`pack_params`)."""
    mu_s, mu_t, scale = params[0:3], params[3:6], params[6:9]
    t_q, band_q, dark_q = int(params[9]), int(params[10]), int(params[11])
    finv = tables["finv"].astype(np.int64)
    enc = tables["enc"]
    L, A, B = _lab_np(img, tables)
    lab = (L, A, B)
    out_lab = [((lab[c] - mu_s[c]) * scale[c] + (1 << 15) >> 16) + mu_t[c] for c in range(3)]
    fy = _div_round((out_lab[0] + 16 * 1024) * 64, 116)
    fx = fy + _div_round(out_lab[1] * 64, 500)
    fz = fy - _div_round(out_lab[2] * 64, 200)
    t = [finv[np.clip(f, F_MIN, F_MAX) - F_MIN] for f in (fx, fy, fz)]
    mi = XYZN_TO_RGB_Q20
    rgb = [
        enc[
            np.clip(
                (mi[c, 0] * t[0] + mi[c, 1] * t[1] + mi[c, 2] * t[2] + (1 << 19)) >> 20, 0, 65536
            )
        ]
        for c in range(3)
    ]
    new = np.stack(rgb, axis=-1).astype(np.int64)
    w = np.where(L <= t_q - band_q, 256, ((t_q - L) * 256 + band_q // 2) // band_q)
    w = np.where((L < dark_q) | (L >= t_q), 0, w)[..., None]
    blended = (w * new + (256 - w) * img.astype(np.int64) + 128) >> 8
    return blended.astype(np.uint8)


def weights_np(img: np.ndarray, params: np.ndarray, tables: dict[str, np.ndarray]) -> np.ndarray:
    """The 8-bit blend weight (0..256) of every pixel: 0 = kept as is (glass, black)."""
    t_q, band_q, dark_q = int(params[9]), int(params[10]), int(params[11])
    L, _, _ = _lab_np(img, tables)
    w = np.where(L <= t_q - band_q, 256, ((t_q - L) * 256 + band_q // 2) // band_q)
    return np.where((L < dark_q) | (L >= t_q), 0, w).astype(np.int64)


def lab_q10_np(img: np.ndarray, tables: dict[str, np.ndarray]) -> np.ndarray:
    """CIELAB in Q10 of every pixel (HxWx3 int64), numpy."""
    return np.stack(_lab_np(img, tables), axis=-1)


# --------------------------------------------------------------------------- numba

if HAVE_NUMBA:

    @numba.njit(cache=_CACHE, nogil=True, inline="always")
    def _lab_nb(r, g, b, lin, cbrt, m):  # pragma: no cover - compiled
        """One pixel's Q10 L*, a*, b* (the forward path of the module docstring)."""
        lr = np.int64(lin[r])
        lg = np.int64(lin[g])
        lb = np.int64(lin[b])
        tx = (m[0, 0] * lr + m[0, 1] * lg + m[0, 2] * lb + 524288) >> 20
        ty = (m[1, 0] * lr + m[1, 1] * lg + m[1, 2] * lb + 524288) >> 20
        tz = (m[2, 0] * lr + m[2, 1] * lg + m[2, 2] * lb + 524288) >> 20
        fx = np.int64(cbrt[min(max(tx, 0), 65536)])
        fy = np.int64(cbrt[min(max(ty, 0), 65536)])
        fz = np.int64(cbrt[min(max(tz, 0), 65536)])
        lv = (116 * fy - 1048576 + 32) >> 6
        av = (500 * (fx - fy) + 32) >> 6
        bv = (200 * (fy - fz) + 32) >> 6
        return lv, av, bv

    @numba.njit(cache=_CACHE, nogil=True)
    def _stats_hist_nb(img, stride, lin, cbrt, m, hist):  # pragma: no cover - compiled
        h, w = img.shape[0], img.shape[1]
        for y in range(0, h, stride):
            for x in range(0, w, stride):
                r = img[y, x, 0]
                g = img[y, x, 1]
                b = img[y, x, 2]
                lv, av, bv = _lab_nb(r, g, b, lin, cbrt, m)
                k = min(max(lv >> 8, 0), 511)
                hist[k, 0] += 1
                hist[k, 1] += lv
                hist[k, 2] += av
                hist[k, 3] += bv
                hist[k, 4] += lv * lv
                hist[k, 5] += av * av
                hist[k, 6] += bv * bv
                if r == 255 or g == 255 or b == 255:
                    hist[k, 7] += 1

    @numba.njit(cache=_CACHE, nogil=True)
    def _transform_nb(img, out, params, lin, cbrt, finv, enc, m, mi):  # pragma: no cover
        h, w = img.shape[0], img.shape[1]
        mu_s0, mu_s1, mu_s2 = params[0], params[1], params[2]
        mu_t0, mu_t1, mu_t2 = params[3], params[4], params[5]
        sc0, sc1, sc2 = params[6], params[7], params[8]
        t_q, band_q, dark_q = params[9], params[10], params[11]
        f_min = -16384
        f_max = 81920
        for y in range(h):
            for x in range(w):
                r = img[y, x, 0]
                g = img[y, x, 1]
                b = img[y, x, 2]
                lv, av, bv = _lab_nb(r, g, b, lin, cbrt, m)
                if lv < dark_q or lv >= t_q:
                    out[y, x, 0] = r
                    out[y, x, 1] = g
                    out[y, x, 2] = b
                    continue
                l2 = (((lv - mu_s0) * sc0 + 32768) >> 16) + mu_t0
                a2 = (((av - mu_s1) * sc1 + 32768) >> 16) + mu_t1
                b2 = (((bv - mu_s2) * sc2 + 32768) >> 16) + mu_t2
                gy = (2 * ((l2 + 16384) * 64) + 116) // 232
                gx = gy + (2 * (a2 * 64) + 500) // 1000
                gz = gy - (2 * (b2 * 64) + 200) // 400
                gx = min(max(gx, f_min), f_max)
                gy = min(max(gy, f_min), f_max)
                gz = min(max(gz, f_min), f_max)
                xx = np.int64(finv[gx - f_min])
                yy = np.int64(finv[gy - f_min])
                zz = np.int64(finv[gz - f_min])
                rr = (mi[0, 0] * xx + mi[0, 1] * yy + mi[0, 2] * zz + 524288) >> 20
                gg = (mi[1, 0] * xx + mi[1, 1] * yy + mi[1, 2] * zz + 524288) >> 20
                bb = (mi[2, 0] * xx + mi[2, 1] * yy + mi[2, 2] * zz + 524288) >> 20
                r2 = np.int64(enc[min(max(rr, 0), 65536)])
                g2 = np.int64(enc[min(max(gg, 0), 65536)])
                b2v = np.int64(enc[min(max(bb, 0), 65536)])
                if lv <= t_q - band_q:
                    out[y, x, 0] = r2
                    out[y, x, 1] = g2
                    out[y, x, 2] = b2v
                else:
                    wt = ((t_q - lv) * 256 + band_q // 2) // band_q
                    out[y, x, 0] = (wt * r2 + (256 - wt) * np.int64(r) + 128) >> 8
                    out[y, x, 1] = (wt * g2 + (256 - wt) * np.int64(g) + 128) >> 8
                    out[y, x, 2] = (wt * b2v + (256 - wt) * np.int64(b) + 128) >> 8


def stats_hist_numba(img: np.ndarray, stride: int, tables: dict[str, np.ndarray]) -> np.ndarray:
    """Per-L*-bin sums over every ``stride``-th pixel (compiled)."""
    hist = np.zeros((N_BINS, HIST_COLS), dtype=np.int64)
    _stats_hist_nb(img, stride, tables["lin"], tables["cbrt"], RGB_TO_XYZN_Q20, hist)
    return hist


def transform_numba(
    img: np.ndarray, params: np.ndarray, tables: dict[str, np.ndarray]
) -> np.ndarray:
    """Fused transform (compiled). ``params``: int64[12] (see :func:`pack_params`)."""
    out = np.empty_like(img)
    _transform_nb(
        img,
        out,
        params,
        tables["lin"],
        tables["cbrt"],
        tables["finv"],
        tables["enc"],
        RGB_TO_XYZN_Q20,
        XYZN_TO_RGB_Q20,
    )
    return out


def pack_params(
    mu_s: tuple[int, ...],
    mu_t: tuple[int, ...],
    scale: tuple[int, ...],
    threshold_q10: int,
    band_q10: int,
    dark_q10: int,
) -> np.ndarray:
    """The transform's integer parameters as one int64 vector."""
    return np.array(
        [*mu_s, *mu_t, *scale, threshold_q10, max(band_q10, 1), dark_q10], dtype=np.int64
    )


KERNELS = {"numpy": (stats_hist_np, transform_np)}
if HAVE_NUMBA:
    KERNELS["numba"] = (stats_hist_numba, transform_numba)
assert F_MIN == -16384 and F_MAX == 81920  # the compiled kernel inlines these
