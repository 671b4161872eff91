"""Class mappings: the two presets, round trips, and one-line errors for bad files."""

from __future__ import annotations

import json

import pytest

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.mappings import ClassMapping, available_mappings, load_mapping


def test_presets_are_listed():
    assert {"pbc8", "marrow22"} <= set(available_mappings())


def test_pbc8_default_mapping():
    m = load_mapping()
    assert m.name == "pbc8"
    assert m.classes == (
        "basophil", "eosinophil", "erythroblast", "ig",
        "lymphocyte", "monocyte", "neutrophil", "platelet",
    )  # fmt: skip
    assert m.abnormal_classes == ["erythroblast", "ig"]
    assert m.abnormal_indices == [2, 3]
    assert m.normal_indices == [0, 1, 4, 5, 6, 7]
    assert m.is_abnormal("ig") and not m.is_abnormal("neutrophil")


def test_marrow_preset_follows_mutar_table2():
    m = load_mapping("marrow22")
    desc = dict(zip(m.descriptions, m.abnormal))
    abnormal = {
        "erythroblast", "artefact", "promyelocyte", "blast", "myelocyte", "not identifiable",
        "metamyelocyte", "proerythroblast", "other cell", "hairy cell", "immature lymphocyte",
        "faggot cell", "smudge cell", "abnormal eosinophil",
    }  # fmt: skip
    normal = {
        "segmented neutrophil", "band neutrophil", "lymphocyte", "plasma cell",
        "eosinophil", "monocyte", "basophil",
    }  # fmt: skip
    assert {d for d, a in desc.items() if a} == abnormal
    assert {d for d, a in desc.items() if not a} == normal


def test_round_trip_and_save(tmp_path):
    m = load_mapping("pbc8")
    assert ClassMapping.from_dict(m.to_dict()) == m
    m.save(tmp_path / "m.json")
    assert load_mapping(tmp_path / "m.json") == m


def test_unknown_class_lookup():
    with pytest.raises(EdgecellsError, match="unknown class 'blast'"):
        load_mapping().index("blast")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"classes": []}', "non-empty list"),
        (
            '{"classes": [{"name": "a", "abnormal": "yes"}, {"name": "b", "abnormal": false}]}',
            "'abnormal' must be true or false",
        ),
        (
            '{"classes": [{"name": "a", "abnormal": true}, {"name": "a", "abnormal": false}]}',
            "duplicate class names a",
        ),
        ('{"classes": [{"name": "a", "abnormal": true}]}', "at least 2 classes"),
        ('{"schema": "other/9", "classes": []}', "unsupported mapping schema"),
    ],
)
def test_bad_mapping_file_is_one_line_error(tmp_path, content, message):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(EdgecellsError) as info:
        load_mapping(p)
    text = str(info.value)
    assert message in text
    assert str(p) in text and "\n" not in text


def test_missing_mapping_names_presets(tmp_path):
    with pytest.raises(EdgecellsError, match="presets: .*pbc8"):
        load_mapping("nosuchpreset")
    with pytest.raises(EdgecellsError, match="no such mapping"):
        load_mapping(tmp_path / "absent.json")


def test_shipped_files_are_valid_json():
    from edgecells.edge.mappings import PRESET_DIR

    for name in available_mappings():
        d = json.loads((PRESET_DIR / f"{name}.json").read_text(encoding="utf-8"))
        assert d["schema"] == "edgecells.mapping/1" and d["name"] == name
        assert ClassMapping.from_dict(d).num_classes == len(d["classes"])
