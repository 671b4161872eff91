"""Class names and the normal/abnormal mapping of a classifier, as data.

A mapping is a small JSON file (``edge/data/mappings/*.json``) that lists the model's
output classes in order and says which are abnormal findings. The model bundle carries
it, so the device never re-types class names. Two presets ship: ``pbc8`` (the default,
8 PBC peripheral-blood classes) and ``marrow22`` (bone-marrow classes, Mutar et al. 2025).

```python
m = load_mapping("pbc8")                  # a preset name, or a path to a JSON file
m.classes, m.abnormal_indices
m.to_dict(); ClassMapping.from_dict(d)    # for embedding in a manifest
```
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecells.edge.errors import EdgecellsError
from edgecells.edge.fileio import write_json_atomic

SCHEMA = "edgecells.mapping/1"
DEFAULT_MAPPING = "pbc8"
PRESET_DIR = Path(__file__).resolve().parent / "data" / "mappings"


@dataclass(frozen=True)
class ClassMapping:
    """Output classes of a classifier (in model output order) and which are abnormal."""

    name: str
    classes: tuple[str, ...]
    abnormal: tuple[bool, ...]
    descriptions: tuple[str, ...] = ()
    title: str = ""
    description: str = ""
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def abnormal_indices(self) -> list[int]:
        return [i for i, a in enumerate(self.abnormal) if a]

    @property
    def normal_indices(self) -> list[int]:
        return [i for i, a in enumerate(self.abnormal) if not a]

    @property
    def abnormal_classes(self) -> list[str]:
        return [c for c, a in zip(self.classes, self.abnormal) if a]

    def index(self, name: str) -> int:
        """Output index of class ``name``; EdgecellsError if the mapping lacks it."""
        try:
            return self.classes.index(name)
        except ValueError:
            raise EdgecellsError(
                f"mapping {self.name}: unknown class {name!r} (classes: {', '.join(self.classes)})"
            ) from None

    def is_abnormal(self, name: str) -> bool:
        return self.abnormal[self.index(name)]

    def to_dict(self) -> dict[str, Any]:
        descs = self.descriptions or ("",) * len(self.classes)
        return {
            "schema": SCHEMA,
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "source": self.source,
            "classes": [
                {"name": c, "abnormal": a, "description": d}
                for c, a, d in zip(self.classes, self.abnormal, descs)
            ],
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "mapping") -> ClassMapping:
        """Build and validate a mapping; EdgecellsError naming ``where`` on any problem."""
        if not isinstance(d, dict):
            raise EdgecellsError(f"{where}: a mapping must be a JSON object")
        schema = d.get("schema", SCHEMA)
        if schema != SCHEMA:
            raise EdgecellsError(f"{where}: unsupported mapping schema {schema!r} (want {SCHEMA})")
        entries = d.get("classes")
        if not isinstance(entries, list) or not entries:
            raise EdgecellsError(f"{where}: 'classes' must be a non-empty list")
        names: list[str] = []
        abnormal: list[bool] = []
        descs: list[str] = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict):
                raise EdgecellsError(f"{where}: classes[{i}] must be an object with name/abnormal")
            n, a = e.get("name"), e.get("abnormal")
            if not isinstance(n, str) or not n.strip():
                raise EdgecellsError(f"{where}: classes[{i}] has no valid 'name'")
            if not isinstance(a, bool):
                raise EdgecellsError(f"{where}: class {n!r}: 'abnormal' must be true or false")
            names.append(n)
            abnormal.append(a)
            descs.append(str(e.get("description", "")))
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise EdgecellsError(f"{where}: duplicate class names {', '.join(dupes)}")
        if len(names) < 2:
            raise EdgecellsError(f"{where}: a classifier needs at least 2 classes")
        name = d.get("name", "custom")
        if not isinstance(name, str):
            raise EdgecellsError(f"{where}: 'name' must be a string")
        known = {"schema", "name", "title", "description", "source", "classes"}
        return cls(
            name=name,
            classes=tuple(names),
            abnormal=tuple(abnormal),
            descriptions=tuple(descs),
            title=str(d.get("title", "")),
            description=str(d.get("description", "")),
            source=str(d.get("source", "")),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json_atomic(path, self.to_dict())


def available_mappings() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_mapping(name_or_path: str | os.PathLike[str] = DEFAULT_MAPPING) -> ClassMapping:
    """Load a preset by name (``pbc8``, ``marrow22``) or a mapping JSON file by path."""
    s = str(name_or_path)
    p = Path(s)
    if not p.suffix and (PRESET_DIR / f"{s}.json").is_file():
        p = PRESET_DIR / f"{s}.json"
    if not p.is_file():
        raise EdgecellsError(
            f"{s}: no such mapping file or preset (presets: {', '.join(available_mappings())})"
        )
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgecellsError(f"{p}: cannot read mapping ({exc})") from None
    except json.JSONDecodeError as exc:
        raise EdgecellsError(f"{p}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    return ClassMapping.from_dict(d, where=str(p))
