"""The model to convert: a Keras file (.keras / .h5), a SavedModel folder, or an ONNX file.

:func:`load_source` reads it once and exposes what every converter needs: the input size,
the number of outputs, a TensorFlow concrete function (Keras / SavedModel) and a float32
ONNX export. TensorFlow, tf2onnx and onnx are imported inside the functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecells.edge.bundle import sha256_file
from edgecells.edge.errors import EdgecellsError

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
ONNX_OPSET = 17
INPUT_NAME = "image"


@dataclass
class SourceModel:
    """A loaded source model. ``kind`` is keras, savedmodel or onnx."""

    path: Path
    kind: str
    sha256: str
    input_size: int
    num_outputs: int
    keras_model: Any = None
    saved_model: Any = None
    _onnx_float: bytes | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    def concrete_function(self) -> Any:
        """A tf concrete function image (N,S,S,3) float32 -> probabilities (Keras/SavedModel)."""
        import tensorflow as tf

        if self.kind == "onnx":
            raise EdgecellsError(
                f"{self.path}: TFLite conversion needs a Keras or SavedModel source, not ONNX "
                "(convert the ONNX file to openvino/onnx formats, or give the Keras model)"
            )
        spec = tf.TensorSpec([None, self.input_size, self.input_size, 3], tf.float32, INPUT_NAME)
        if self.kind == "keras":
            model = self.keras_model

            @tf.function(input_signature=[spec])
            def serve(image: Any) -> Any:
                return model(image, training=False)

        else:
            sig = self.saved_model.signatures["serving_default"]
            in_name = list(sig.structured_input_signature[1].keys())[0]

            @tf.function(input_signature=[spec])
            def serve(image: Any) -> Any:
                return list(sig(**{in_name: image}).values())[0]

        return serve.get_concrete_function()

    def onnx_float(self) -> bytes:
        """The float32 model as ONNX bytes (tf2onnx for Keras/SavedModel; the file itself)."""
        if self._onnx_float is not None:
            return self._onnx_float
        if self.kind == "onnx":
            self._onnx_float = self.path.read_bytes()
            return self._onnx_float
        import tensorflow as tf
        import tf2onnx

        spec = (tf.TensorSpec([None, self.input_size, self.input_size, 3], tf.float32, INPUT_NAME),)
        fn = self.concrete_function()
        try:
            proto, _ = tf2onnx.convert.from_function(
                tf.function(fn), input_signature=spec, opset=ONNX_OPSET
            )
        except Exception as exc:  # tf2onnx raises many types
            raise EdgecellsError(f"{self.path}: ONNX export failed ({exc})") from None
        self._onnx_float = proto.SerializeToString()
        return self._onnx_float


def _input_size_from_shape(shape: Any, path: Path) -> int:
    dims = list(shape)
    if len(dims) != 4 or dims[3] != 3 or dims[1] is None or dims[1] != dims[2]:
        raise EdgecellsError(
            f"{path}: model input must be NHWC RGB square (N, S, S, 3), got {tuple(dims)}"
        )
    return int(dims[1])


def load_source(path: str | os.PathLike[str]) -> SourceModel:
    """Load a model file/folder for conversion; EdgecellsError naming it when unusable."""
    p = Path(path)
    if not p.exists():
        raise EdgecellsError(f"{p}: no such model file or folder")
    digest = _digest(p)
    if p.is_dir():
        if not (p / "saved_model.pb").is_file():
            raise EdgecellsError(f"{p}: folder is not a SavedModel (no saved_model.pb)")
        import tensorflow as tf

        try:
            sm = tf.saved_model.load(str(p))
            sig = sm.signatures["serving_default"]
        except (KeyError, OSError, ValueError) as exc:
            raise EdgecellsError(f"{p}: cannot load SavedModel ({exc})") from None
        in_spec = list(sig.structured_input_signature[1].values())[0]
        size = _input_size_from_shape(in_spec.shape.as_list(), p)
        out_spec = list(sig.structured_outputs.values())[0]
        return SourceModel(p, "savedmodel", digest, size, int(out_spec.shape[-1]), saved_model=sm)
    suffix = p.suffix.lower()
    if suffix in KERAS_SUFFIXES:
        import keras

        try:
            model = keras.models.load_model(p, compile=False)
        except Exception as exc:  # keras raises many types for a bad file
            raise EdgecellsError(f"{p}: cannot load Keras model ({exc})") from None
        return from_keras(model, p, digest)
    if suffix == ".onnx":
        import onnx

        try:
            m = onnx.load(str(p))
            onnx.checker.check_model(m)
        except Exception as exc:
            raise EdgecellsError(f"{p}: not a valid ONNX model ({exc})") from None
        inp = m.graph.input[0].type.tensor_type.shape.dim
        shape = [d.dim_value if d.dim_value > 0 else None for d in inp]
        size = _input_size_from_shape(shape, p)
        out = m.graph.output[0].type.tensor_type.shape.dim
        return SourceModel(p, "onnx", digest, size, int(out[-1].dim_value or 0))
    raise EdgecellsError(
        f"{p}: unsupported model type (expected .keras, .h5, a SavedModel folder or .onnx)"
    )


def from_keras(model: Any, path: str | os.PathLike[str], digest: str = "") -> SourceModel:
    """Wrap an in-memory Keras model (zoo, tests) as a :class:`SourceModel`."""
    p = Path(path)
    size = _input_size_from_shape(model.input_shape, p)
    outs = int(model.output_shape[-1])
    return SourceModel(p, "keras", digest, size, outs, keras_model=model)


def _digest(p: Path) -> str:
    if p.is_file():
        return sha256_file(p)
    import hashlib

    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(str(f.relative_to(p)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()
