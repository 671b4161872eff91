"""The edge-sized cell classifier: a small MobileNetV2-style network.

Inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 linear project, identity
shortcut when shapes match) with BatchNorm and ReLU6, global average pooling and a
softmax Dense head. Every op quantizes to full-integer int8 in TFLite (Conv2D,
DepthwiseConv2D, BN folded into them at conversion, ReLU6, Add, Mean, FullyConnected,
Softmax); there is no hard-swish, squeeze-excite or resize inside.

Input: RGB float32 in [0, 255], NHWC; a first ``Rescaling`` layer maps it to [-1, 1],
so an int8 TFLite input is exactly ``uint8 - 128`` (see docs/CONTRACTS.md).
TensorFlow/Keras are imported inside the functions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ARCH_NAME = "edgecells-ir-v1"


@dataclass(frozen=True)
class ArchConfig:
    """Width and depth of the network; ``blocks`` rows are (expansion, channels, repeats,
    stride) as in the MobileNetV2 paper."""

    stem_channels: int = 16
    blocks: tuple[tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1),
        (4, 24, 2, 2),
        (4, 32, 3, 2),
        (4, 64, 3, 2),
        (4, 96, 2, 1),
        (6, 128, 2, 2),
    )
    head_channels: int = 384
    dropout: float = 0.2
    # BatchNorm moving-average momentum: 0.9 (not Keras' 0.99) so the inference statistics
    # follow the weights within ~10 steps; with 0.99 a short from-scratch run evaluates
    # with stale statistics (validation collapsed to one class in the first epochs).
    bn_momentum: float = 0.9

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = [list(b) for b in self.blocks]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchConfig:
        d = dict(d)
        if "blocks" in d:
            d["blocks"] = tuple(tuple(int(v) for v in b) for b in d["blocks"])
        return cls(**d)


def build_classifier(
    num_classes: int, size: int, arch: ArchConfig | None = None, name: str = ARCH_NAME
) -> Any:
    """A compiled-free Keras model: ``(size, size, 3)`` float32 [0,255] -> softmax."""
    import keras
    from keras import layers

    arch = arch or ArchConfig()

    def bn(name: str) -> Any:
        return layers.BatchNormalization(momentum=arch.bn_momentum, name=name)

    inputs = keras.Input((size, size, 3), dtype="float32", name="image")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(inputs)
    x = layers.Conv2D(
        arch.stem_channels, 3, strides=2, padding="same", use_bias=False, name="stem_conv"
    )(x)
    x = bn("stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    in_ch = arch.stem_channels
    block = 0
    for t, c, n, s in arch.blocks:
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"b{block}_"
            y = x
            if t != 1:
                y = layers.Conv2D(in_ch * t, 1, use_bias=False, name=p + "expand")(y)
                y = bn(p + "expand_bn")(y)
                y = layers.ReLU(6.0, name=p + "expand_relu")(y)
            y = layers.DepthwiseConv2D(
                3, strides=stride, padding="same", use_bias=False, name=p + "dw"
            )(y)
            y = bn(p + "dw_bn")(y)
            y = layers.ReLU(6.0, name=p + "dw_relu")(y)
            y = layers.Conv2D(c, 1, use_bias=False, name=p + "project")(y)
            y = bn(p + "project_bn")(y)
            if stride == 1 and in_ch == c:
                y = layers.Add(name=p + "add")([x, y])
            x = y
            in_ch = c
            block += 1
    x = layers.Conv2D(arch.head_channels, 1, use_bias=False, name="head_conv")(x)
    x = bn("head_bn")(x)
    x = layers.ReLU(6.0, name="head_relu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if arch.dropout > 0:
        x = layers.Dropout(arch.dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name=name)


def count_flops(model: Any) -> int:
    """Multiply-adds x 2 of the convolution and dense layers for one image."""
    from keras import layers

    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            total += 2 * h * w * c * kh * kw
        elif isinstance(layer, layers.Conv2D):
            _, h, w, co = layer.output.shape
            ci = layer.input.shape[-1]
            kh, kw = layer.kernel_size
            total += 2 * h * w * co * ci * kh * kw
        elif isinstance(layer, layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return int(total)


def model_summary(model: Any) -> dict[str, Any]:
    """Parameters, FLOPs and the int8 weight size estimate (1 byte per weight)."""
    n_params = int(model.count_params())
    return {
        "arch": model.name,
        "input_size": int(model.input_shape[1]),
        "params": n_params,
        "flops": count_flops(model),
        "int8_weights_bytes_estimate": n_params,
    }
