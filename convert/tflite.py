"""Full-integer int8 TFLite (and its float32 reference) with the TFLite converter.

Every op is int8 (``TFLITE_BUILTINS_INT8``); the model's input and output are int8
(default: input = pixel - 128, scale 1, zero point -128) or uint8 (input = pixel), as
asked. Ranges come from the calibration set, fed in its stored (device-normalized) form.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from edgecells.convert.source import SourceModel
from edgecells.edge.errors import EdgecellsError

IO_TYPES = ("int8", "uint8")
CALIB_BATCH = 1  # the representative dataset yields one image at a time


def _converter(source: SourceModel) -> Any:
    import tensorflow as tf

    if source.kind == "keras":
        return tf.lite.TFLiteConverter.from_keras_model(source.keras_model)
    if source.kind == "savedmodel":
        return tf.lite.TFLiteConverter.from_saved_model(str(source.path))
    source.concrete_function()  # raises the "needs Keras or SavedModel" error for ONNX
    raise AssertionError("unreachable")


def representative(calib_x: np.ndarray) -> Any:
    """The converter's representative dataset: float32 images 0..255, one per step."""

    def gen() -> Iterator[list[np.ndarray]]:
        for i in range(0, calib_x.shape[0], CALIB_BATCH):
            yield [calib_x[i : i + CALIB_BATCH].astype(np.float32)]

    return gen


def convert_float(source: SourceModel) -> bytes:
    """The float32 TFLite reference."""
    conv = _converter(source)
    try:
        return bytes(conv.convert())
    except Exception as exc:  # converter errors are many types
        raise EdgecellsError(f"{source.path}: TFLite float conversion failed ({exc})") from None


def convert_int8(source: SourceModel, calib_x: np.ndarray, io_type: str = "int8") -> bytes:
    """Full-integer int8 TFLite with ``io_type`` (int8/uint8) input and output."""
    import tensorflow as tf

    if io_type not in IO_TYPES:
        raise EdgecellsError(f"TFLite input/output type must be one of {IO_TYPES}, not {io_type}")
    conv = _converter(source)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative(calib_x)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8 if io_type == "int8" else tf.uint8
    conv.inference_output_type = tf.int8 if io_type == "int8" else tf.uint8
    try:
        return bytes(conv.convert())
    except Exception as exc:
        raise EdgecellsError(
            f"{source.path}: TFLite int8 conversion failed ({str(exc).splitlines()[0]}); "
            "an op without an int8 kernel is the usual cause"
        ) from None


def io_specs(model_bytes: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Input and output tensor specs (manifest form) read from a .tflite model."""
    from edgecells.edge.backends.litert import interpreter_class

    interp = interpreter_class()(model_content=model_bytes)
    specs = []
    for d in (interp.get_input_details()[0], interp.get_output_details()[0]):
        dtype = np.dtype(d["dtype"]).name
        scale, zp = d["quantization"]
        quant = dtype in ("int8", "uint8") and scale > 0
        shape = [-1, *[int(v) for v in d["shape"][1:]]]
        specs.append(
            {
                "shape": shape,
                "dtype": dtype,
                "scale": float(scale) if quant else None,
                "zero_point": int(zp) if quant else None,
            }
        )
    return specs[0], specs[1]


def debug_layers(
    source: SourceModel, calib_x: np.ndarray, top: int = 5, max_images: int = 32
) -> list[dict[str, Any]]:
    """TFLite QuantizationDebugger: the layers whose int8 output differs most from float.

    Returns up to ``top`` rows {layer, op, rmse_over_scale, scale, mean_error, max_abs_error},
    worst first (RMSE in units of the layer's quantization step: ~0.29 is ideal
    rounding; much larger values mark the layers to blame).
    """
    import tensorflow as tf

    x = calib_x[:max_images]
    conv = _converter(source)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative(x)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=conv, debug_dataset=representative(x)
    )
    debugger.run()
    import csv
    import io

    buf = io.StringIO()
    debugger.layer_statistics_dump(buf)
    buf.seek(0)
    rows = []
    for r in csv.DictReader(buf):
        try:
            scale = float(r["scale"])
            mse = float(r["mean_squared_error"])
            mean_err = float(r["mean_error"])
            max_err = float(r["max_abs_error"])
        except (KeyError, ValueError):
            continue
        rows.append(
            {
                "layer": r.get("tensor_name", ""),
                "op": r.get("op_name", ""),
                "rmse_over_scale": float(np.sqrt(mse) / scale) if scale > 0 else float("nan"),
                "scale": scale,
                "mean_error": mean_err,
                "max_abs_error": max_err,
            }
        )
    rows = [r for r in rows if np.isfinite(r["rmse_over_scale"])]
    rows.sort(key=lambda r: -r["rmse_over_scale"])
    return rows[:top]
