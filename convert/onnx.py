"""ONNX: the float32 export (tf2onnx) and int8 QDQ by onnxruntime static quantization.

QDQ (QuantizeLinear/DequantizeLinear pairs around each op) runs on onnxruntime's CPU
int8 kernels and is what TensorRT on a Jetson reads for int8. Weights are per-channel
(symmetric int8), activations per-tensor int8 with ranges from the calibration set.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgecells.convert.source import SourceModel
from edgecells.edge.errors import EdgecellsError

CALIB_BATCH = 16
# Ops that stay float (their int8 kernels cost accuracy for no speed on small heads).
FLOAT_OPS = ("Softmax", "Sigmoid")


class _Reader:
    """onnxruntime CalibrationDataReader over the calibration images."""

    def __init__(self, name: str, x: np.ndarray) -> None:
        self.name = name
        self.x = x
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= self.x.shape[0]:
            return None
        b = self.x[self.i : self.i + CALIB_BATCH].astype(np.float32)
        self.i += CALIB_BATCH
        return {self.name: b}

    def rewind(self) -> None:
        self.i = 0

    def __iter__(self) -> _Reader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = self.get_next()
        if b is None:
            raise StopIteration
        return b


def export_float(source: SourceModel) -> bytes:
    """Float32 ONNX with a dynamic batch dimension, shape-inferred and preprocessed."""
    return source.onnx_float()


def quantize_int8(float_model: bytes, calib_x: np.ndarray, per_channel: bool = True) -> bytes:
    """Static QDQ int8 quantization of a float ONNX model (bytes in, bytes out)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="edgecells-onnx-") as tmp:
        fp = Path(tmp) / "float.onnx"
        pre = Path(tmp) / "float_pre.onnx"
        out = Path(tmp) / "int8.onnx"
        fp.write_bytes(float_model)
        try:
            quant_pre_process(str(fp), str(pre), skip_symbolic_shape=True)
        except Exception:  # pre-processing is an optimization; quantize the original
            pre = fp
        model = onnx.load(str(pre))
        in_name = model.graph.input[0].name
        ops = sorted({n.op_type for n in model.graph.node} - set(FLOAT_OPS))
        try:
            quantize_static(
                str(pre),
                str(out),
                _Reader(in_name, calib_x),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                op_types_to_quantize=ops,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        except Exception as exc:
            raise EdgecellsError(f"ONNX int8 quantization failed ({exc})") from None
        return out.read_bytes()


def io_specs(model_bytes: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Input/output specs (manifest form); QDQ models keep float32 input and output."""
    import onnx

    m = onnx.load_from_string(model_bytes)
    specs = []
    for v in (m.graph.input[0], m.graph.output[0]):
        t = v.type.tensor_type
        dims = [d.dim_value if d.dim_value > 0 else -1 for d in t.shape.dim]
        dims[0] = -1
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        specs.append({"shape": dims, "dtype": dtype, "scale": None, "zero_point": None})
    return specs[0], specs[1]


def debug_layers(
    float_model: bytes, int8_model: bytes, x: np.ndarray, top: int = 5
) -> list[dict[str, Any]]:
    """Per-tensor float-vs-QDQ activation error (onnxruntime's qdq_loss_debug).

    Rows {layer, xmodel_err_db, qdq_err_db}, worst first: a low SQNR (dB) marks the
    tensors to blame.
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        create_weight_matching,  # noqa: F401 - imported to fail early if API moved
        modify_model_output_intermediate_tensors,
    )

    with tempfile.TemporaryDirectory(prefix="edgecells-onnxdbg-") as tmp:
        fp, qp = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        fp.write_bytes(float_model)
        qp.write_bytes(int8_model)
        fa, qa = Path(tmp) / "f_aug.onnx", Path(tmp) / "q_aug.onnx"
        modify_model_output_intermediate_tensors(str(fp), str(fa))
        modify_model_output_intermediate_tensors(str(qp), str(qa))
        import onnx

        name = onnx.load(str(fp)).graph.input[0].name
        f_act = collect_activations(str(fa), _Reader(name, x))
        q_act = collect_activations(str(qa), _Reader(name, x))
        match = create_activation_matching(q_act, f_act)
        err = compute_activation_error(match)
    rows = [
        {
            "layer": k,
            "xmodel_err_db": float(v.get("xmodel_err", np.nan)),
            "qdq_err_db": float(v.get("qdq_err", np.nan)),
        }
        for k, v in err.items()
    ]
    rows = [r for r in rows if np.isfinite(r["xmodel_err_db"])]
    rows.sort(key=lambda r: r["xmodel_err_db"])
    return rows[:top]
