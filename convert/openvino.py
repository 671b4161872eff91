"""OpenVINO IR: float32 from the ONNX export, int8 by NNCF post-training quantization.

NNCF's ``quantize`` inserts FakeQuantize ops with ranges from the calibration set
(``subset_size`` = all its images). Comparisons run with the f32 inference precision
hint: without it, CPUs with bf16 support run the "float" model in bf16.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.edge.errors import EdgecellsError

XML, BIN = "model.xml", "model.bin"


def _read_onnx(float_onnx: bytes) -> Any:
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="edgecells-ov-") as tmp:
        p = Path(tmp) / "float.onnx"
        p.write_bytes(float_onnx)
        try:
            return ov.convert_model(str(p))
        except Exception as exc:
            raise EdgecellsError(f"OpenVINO conversion of the ONNX model failed ({exc})") from None


def save(model: Any, folder: Path, stem: str) -> tuple[Path, Path]:
    """Write ``stem.xml`` + ``stem.bin`` (weights not compressed to fp16)."""
    import openvino as ov

    folder.mkdir(parents=True, exist_ok=True)
    xml = folder / f"{stem}.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml, xml.with_suffix(".bin")


def convert_float(float_onnx: bytes) -> Any:
    """An ov.Model (float32) from ONNX bytes."""
    return _read_onnx(float_onnx)


def quantize_int8(
    float_model: Any, calib_x: np.ndarray, ignored_types: tuple[str, ...] = ()
) -> Any:
    """NNCF PTQ int8 of an ov.Model; ``ignored_types`` keeps those op types in float."""
    import nncf

    def transform(x: np.ndarray) -> np.ndarray:
        return x[None].astype(np.float32)

    dataset = nncf.Dataset(list(calib_x), transform)
    kwargs: dict[str, Any] = {}
    if ignored_types:
        kwargs["ignored_scope"] = nncf.IgnoredScope(types=list(ignored_types))
    try:
        return nncf.quantize(
            float_model,
            dataset,
            # MIXED: symmetric weights, asymmetric activations. tf2onnx leaves the
            # depthwise BatchNorms as Mul/Add with signed outputs; symmetric activation
            # ranges (PERFORMANCE) lost 1.4 pp on the reference model, MIXED 0.1 pp.
            preset=nncf.QuantizationPreset.MIXED,
            subset_size=int(calib_x.shape[0]),
            **kwargs,
        )
    except Exception as exc:
        raise EdgecellsError(f"NNCF int8 quantization failed ({exc})") from None


def io_specs(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    specs = []
    for port in (model.inputs[0], model.outputs[0]):
        ps = port.get_partial_shape()
        dims = [d.get_length() if d.is_static else -1 for d in ps]
        dims[0] = -1
        specs.append(
            {
                "shape": dims,
                "dtype": "float32",  # int8 IR keeps a float input; FakeQuantize inside
                "scale": None,
                "zero_point": None,
            }
        )
    return specs[0], specs[1]


DEBUG_OP_TYPES = ("Convolution", "GroupConvolution", "MatMul", "Add", "ReduceMean")


def debug_layers(
    float_model: Any, int8_model: Any, x: np.ndarray, top: int = 5
) -> list[dict[str, Any]]:
    """Per-layer output comparison of the float32 and NNCF int8 IRs (same op names).

    Rows {layer, op, sqnr_db}, worst (lowest signal-to-quantization-noise) first; pass
    the worst layers to NNCF as ``IgnoredScope(names=[...])`` to keep them in float.
    """
    import openvino as ov

    names = [
        op.get_friendly_name()
        for op in float_model.get_ordered_ops()
        if op.get_type_name() in DEBUG_OP_TYPES
    ]
    q_ops = {op.get_friendly_name(): op for op in int8_model.get_ordered_ops()}
    f_ops = {op.get_friendly_name(): op for op in float_model.get_ordered_ops()}
    names = [n for n in names if n in q_ops]
    if not names:
        return []
    core = ov.Core()
    results = []
    for model, ops in ((float_model.clone(), f_ops), (int8_model.clone(), q_ops)):
        lookup = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
        model.add_outputs([lookup[n].output(0) for n in names])
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for img in x:
            res = compiled(img[None].astype(np.float32))
            for j, n in enumerate(names):
                outs[n].append(np.asarray(res[compiled.outputs[j + 1]]))
        results.append(outs)
        del ops
    rows = []
    for n in names:
        f = np.concatenate([a.ravel() for a in results[0][n]]).astype(np.float64)
        q = np.concatenate([a.ravel() for a in results[1][n]]).astype(np.float64)
        noise = np.sum((f - q) ** 2)
        sqnr = float(10 * np.log10(np.sum(f**2) / noise)) if noise > 0 else float("inf")
        rows.append({"layer": n, "op": f_ops[n].get_type_name(), "sqnr_db": round(sqnr, 2)})
    rows.sort(key=lambda r: r["sqnr_db"])
    return rows[:top]
