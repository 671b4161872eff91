"""A tiny but real model bundle for the runtime tests (an ONNX model built with
onnx.helper: mean colour of the crop -> linear -> softmax over the pbc8 classes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PBC8 = [
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
]
ABNORMAL = {"erythroblast", "ig"}


def make_bundle(
    root: Path, size: int = 32, stain_target: dict | None = None, pixel_size_um: float | None = None
) -> Path:
    """Write a verified bundle (one ONNX float32 model) to ``root``; returns ``root``."""
    import onnx
    from onnx import TensorProto, helper

    from edgecells.edge.bundle import file_entry, write_manifest
    from edgecells.edge.mappings import load_mapping

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(3, len(PBC8))) * 0.05).astype(np.float32)
    b = np.linspace(-0.5, 0.5, len(PBC8)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["m", "W"], ["z"]),
        helper.make_node("Add", ["z", "B"], ["l"]),
        helper.make_node("Softmax", ["l"], ["p"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", size, size, 3])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", len(PBC8)])],
        [
            helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.flatten().tolist()),
            helper.make_tensor("B", TensorProto.FLOAT, b.shape, b.tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, root / "model.onnx")
    fe = file_entry(root, "model.onnx")
    manifest = {
        "schema": "edgecells.bundle",
        "schema_version": 1,
        "name": "tiny-test",
        "task": "multiclass",
        "classes": PBC8,
        "mapping": load_mapping("pbc8").to_dict(),
        "stain_target": stain_target,
        "preprocessing": {
            "input_size": size,
            "channels": "RGB",
            "value_range": [0, 255],
            "stain_normalization": "reinhard-fixed-v1" if stain_target else "none",
            "resize": "area",
            **({"pixel_size_um": pixel_size_um, "stats": "crop"} if pixel_size_um else {}),
        },
        "crop": {"side_um": round(size * pixel_size_um, 6)}
        if pixel_size_um
        else {"side_um": 24.0, "min_side_factor": 1.4, "training_side_px": 200},
        "thresholds": {
            "min_confidence": 0.05,
            "screening": {
                "min_cells": 100,
                "abnormal_fraction": 0.05,
                "confidence": 0.95,
                "false_positive_rate": 0.02,
            },
        },
        "models": [
            {
                "id": "onnx-float32",
                "format": "onnx",
                "precision": "float32",
                "backend": "onnxruntime",
                "role": "deploy",
                "path": "model.onnx",
                "sha256": fe.sha256,
                "bytes": fe.bytes,
                "files": [fe.to_dict()],
                "input": {
                    "shape": [-1, size, size, 3],
                    "dtype": "float32",
                    "scale": None,
                    "zero_point": None,
                },
                "output": {
                    "shape": [-1, len(PBC8)],
                    "dtype": "float32",
                    "scale": None,
                    "zero_point": None,
                },
            }
        ],
        "validation": {},
        "provenance": {"data": "synthetic test model"},
    }
    write_manifest(root, manifest)
    return root
