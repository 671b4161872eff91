"""The published architectures users arrive with, built untrained to learn what converts.

``keras.applications`` with ``weights=None`` at the published input sizes, a
``Rescaling`` front so the input is RGB 0..255 like every edgecells model, and the
published head:

- ``inception-resnet-v2-180``: Inception-ResNet-v2, 180x180, one sigmoid (normal vs
  abnormal) - Mutar et al., Iraqi J Hematol 2025;
- ``resnet50-64``, ``resnet50-224``, ``resnet101-64``, ``resnet101-224``: 8-way softmax
  (the BMI 707 PBC study);
- ``vgg19-224``: 8-way softmax (Jarjees et al. 2022).

Weights are random: the point is whether each int8 format converts, how big it gets and
how fast it runs, not accuracy. With no calibration data, :func:`synthetic_calibration`
builds one from augmented crops of the bundled sample frames (stain-normalized with the
shipped bundle's target when there is one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgecells.edge.errors import EdgecellsError

BINARY_MAPPING = {
    "schema": "edgecells.mapping/1",
    "name": "binary",
    "title": "normal vs abnormal (one sigmoid)",
    "description": "Binary screening head of Mutar et al. 2025.",
    "source": "Mutar et al., Iraqi J Hematol 2025",
    "classes": [
        {"name": "normal", "abnormal": False, "description": "normal cell"},
        {"name": "abnormal", "abnormal": True, "description": "abnormal cell"},
    ],
}


@dataclass(frozen=True)
class ZooEntry:
    name: str
    app: str  # keras.applications constructor name
    size: int
    num_classes: int  # 1 = binary sigmoid
    reference: str

    @property
    def binary(self) -> bool:
        return self.num_classes == 1


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("inception-resnet-v2-180", "InceptionResNetV2", 180, 1, "Mutar et al. 2025"),
        ZooEntry("resnet50-64", "ResNet50", 64, 8, "BMI 707 PBC study"),
        ZooEntry("resnet50-224", "ResNet50", 224, 8, "BMI 707 PBC study"),
        ZooEntry("resnet101-64", "ResNet101", 64, 8, "BMI 707 PBC study"),
        ZooEntry("resnet101-224", "ResNet101", 224, 8, "BMI 707 PBC study"),
        ZooEntry("vgg19-224", "VGG19", 224, 8, "Jarjees et al. 2022"),
    )
}

# Input scaling each family was published with (applied inside the model).
_RESCALE: dict[str, tuple[float, float]] = {
    "InceptionResNetV2": (1.0 / 127.5, -1.0),
    "ResNet50": (1.0 / 127.5, -1.0),
    "ResNet101": (1.0 / 127.5, -1.0),
    "VGG19": (1.0 / 127.5, -1.0),
}


def get(name: str) -> ZooEntry:
    if name not in ZOO:
        raise EdgecellsError(f"unknown zoo model {name!r} (choose from {', '.join(ZOO)})")
    return ZOO[name]


def build(name: str, seed: int = 0) -> Any:
    """The untrained Keras model: (S, S, 3) RGB 0..255 -> softmax(8) or sigmoid(1)."""
    import keras
    from keras import layers

    e = get(name)
    keras.utils.set_random_seed(seed)
    ctor: Callable[..., Any] = getattr(keras.applications, e.app)
    inp = keras.Input((e.size, e.size, 3), name="image")
    scale, offset = _RESCALE[e.app]
    x = layers.Rescaling(scale, offset=offset, name="rescale")(inp)
    backbone = ctor(include_top=False, weights=None, input_shape=(e.size, e.size, 3), pooling="avg")
    x = backbone(x)
    if e.binary:
        out = layers.Dense(1, activation="sigmoid", name="abnormal")(x)
    else:
        out = layers.Dense(e.num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name=name.replace("-", "_"))


def classes_and_mapping(name: str) -> tuple[list[str], dict[str, Any], str]:
    """Class names, mapping dict and task for a zoo model's bundle."""
    e = get(name)
    if e.binary:
        return ["normal", "abnormal"], dict(BINARY_MAPPING), "binary"
    from edgecells.edge.mappings import load_mapping

    m = load_mapping("pbc8")
    return list(m.classes), m.to_dict(), "multiclass"


def synthetic_calibration(size: int, n: int, seed: int = 0) -> Any:
    """Augmented crops of the bundled sample frames, normalized like the device does."""
    from edgecells.calibration.calibset import synthetic_calibset
    from edgecells.edge.imageio import read_image
    from edgecells.edge.resources import sample_frames

    images = [read_image(p) for p in sample_frames()]
    target = None
    try:
        from edgecells.edge.bundle import load_bundle

        target = load_bundle(verify=False).load_stain_target()
    except EdgecellsError:
        target = None  # no shipped bundle yet: no stain normalization
    return synthetic_calibset(size, n, seed=seed, images=images or None, target=target)
