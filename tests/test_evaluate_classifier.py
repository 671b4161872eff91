"""``evaluate classifier`` on the fixture test split with models whose answers are known."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURES
from typer.testing import CliRunner

from edgecells.edge.mappings import load_mapping
from edgecells.training.evaluate import evaluate_classifier, plot_evaluation

PBC = FIXTURES / "pbc"


def _constant_model(folder, bias, op=None, size=32):
    """A model that outputs softmax(bias) for every image, saved with its side files."""
    import keras

    inp = keras.Input((size, size, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inp))
    out = keras.layers.Dense(8, activation="softmax")(x)
    model = keras.Model(inp, out)
    dense = model.layers[-1]
    dense.set_weights([np.zeros((3, 8), np.float32), np.asarray(bias, np.float32)])
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    load_mapping("pbc8").save(folder / "mapping.json")
    if op is not None:
        (folder / "metrics.json").write_text(json.dumps({"operating_point": op}))
    return folder / "model.keras"


@pytest.fixture(scope="module")
def neutrophil_model(tmp_path_factory):
    # logits: neutrophil 2.0, erythroblast and ig 1.0, others 0 -> argmax neutrophil;
    # abnormal score = 2e / (2e + e^2 + 5) = 0.356...
    bias = [0, 0, 1.0, 1.0, 0, 0, 2.0, 0]
    return _constant_model(tmp_path_factory.mktemp("const"), bias, op=0.3)


def test_hand_checkable_metrics(neutrophil_model, tmp_path):
    ev = evaluate_classifier(neutrophil_model, PBC, split="test", cache_dir=tmp_path)
    m = ev.metrics.to_dict()
    # 16 test cells, 2 per class; every one is called neutrophil
    assert m["n"] == 16
    assert m["accuracy"] == pytest.approx(2 / 16)
    assert m["balanced_accuracy"] == pytest.approx(1 / 8)  # recall 1 for one class of 8
    assert m["auc_abnormal"] == pytest.approx(0.5)  # every cell has the same score
    # the same abnormal score 0.356 >= 0.3 for all: every cell flagged
    assert m["operating_point"] == 0.3
    assert (m["sensitivity_abnormal"], m["specificity_abnormal"]) == (1.0, 0.0)
    assert m["per_class"]["neutrophil"] == {
        "precision": 2 / 16, "recall": 1.0, "f1": pytest.approx(2 * (1 / 8) / (1 / 8 + 1)),
        "support": 2,
    }  # fmt: skip
    assert m["per_class"]["ig"]["recall"] == 0.0
    assert np.array(m["confusion_matrix"])[:, 6].tolist() == [2] * 8
    assert m["stain_normalization"] is False and m["ms_per_image"] > 0
    # an explicit operating point above the score: nothing flagged
    ev2 = evaluate_classifier(neutrophil_model, PBC, operating_point=0.5, cache_dir=tmp_path)
    assert (ev2.metrics.sensitivity_abnormal, ev2.metrics.specificity_abnormal) == (0.0, 1.0)


def test_plot_written(neutrophil_model, tmp_path):
    ev = evaluate_classifier(neutrophil_model, PBC, split="val", cache_dir=tmp_path)
    assert ev.metrics.n == 8
    png = plot_evaluation(ev, tmp_path / "eval.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_json_and_errors(neutrophil_model, tmp_path):
    from edgecells.cli import app

    runner = CliRunner()
    r = runner.invoke(
        app,
        ["evaluate", "classifier", str(neutrophil_model), "--data", str(PBC), "--json",
         "--cache", str(tmp_path), "--plot", str(tmp_path / "p.png")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    for k in (
        "n", "accuracy", "balanced_accuracy", "auc_abnormal", "sensitivity_abnormal",
        "specificity_abnormal", "operating_point", "per_class", "ms_per_image",
        "confusion_matrix", "classes",
    ):  # fmt: skip
        assert k in d
    assert d["n"] == 16 and (tmp_path / "p.png").is_file()
    r = runner.invoke(app, ["evaluate", "classifier", str(tmp_path / "nope.keras"),
                            "--data", str(PBC)])  # fmt: skip
    assert r.exit_code == 2 and "no such model file or bundle" in r.output
    assert "Traceback" not in r.output
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip")
    r = runner.invoke(app, ["evaluate", "classifier", str(bad), "--data", str(PBC)])
    assert r.exit_code == 2 and "cannot load Keras model" in r.output


def test_missing_target_for_stain_model_is_an_error(tmp_path):
    from edgecells.edge.errors import EdgecellsError

    path = _constant_model(tmp_path / "m", [0] * 8)
    (tmp_path / "m" / "metrics.json").write_text(json.dumps({"config": {"stain": True}}))
    with pytest.raises(EdgecellsError, match="needs its stain target"):
        evaluate_classifier(path, PBC, cache_dir=tmp_path)


@pytest.mark.parametrize("backend", ["litert", "onnxruntime"])
def test_bundle_model_uses_device_preprocessing(backend, tmp_path):
    """A bundle is scored through its backend on exactly prepare_crop's pixels."""
    from edgecells.edge.backends import available_backends, open_classifier
    from edgecells.edge.bundle import load_bundle
    from edgecells.edge.imageio import read_image
    from edgecells.edge.metrics import evaluate_probabilities
    from edgecells.edge.preprocess import prepare_crop
    from edgecells.edge.stain import ReinhardNormalizer

    if backend not in available_backends():
        pytest.skip(f"{backend} not installed")
    bundle_dir = FIXTURES / "bundle_tiny"
    ev = evaluate_classifier(bundle_dir, PBC, split="test", backend=backend, cache_dir=tmp_path)
    assert ev.metrics.n == 16 and ev.metrics.extra["model_kind"].startswith("bundle:")
    b = load_bundle(bundle_dir)
    norm = ReinhardNormalizer(b.load_stain_target())
    clf = open_classifier(b, backend=backend)
    rows = [r.split(",") for r in (PBC / "splits.csv").read_text().splitlines()[1:]]
    test = [(PBC / p, lab) for p, lab, split, *_ in rows if split == "test"]
    x = np.stack([prepare_crop(read_image(p), norm, b.input_size) for p, _ in test])
    y = np.array([b.classes.index(lab) for _, lab in test])
    direct = evaluate_probabilities(
        y, clf.predict(x), b.classes, list(np.nonzero(b.abnormal_mask)[0]), 0.5
    )
    assert ev.metrics.confusion_matrix == direct.confusion_matrix
    assert ev.metrics.auc_abnormal == pytest.approx(direct.auc_abnormal)
