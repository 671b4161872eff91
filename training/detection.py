"""Scoring the cell detector against Pascal VOC boxes (host-side evaluation)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgecells.edge.errors import EdgecellsError


def read_voc(path: str | Path) -> dict[str, list[tuple[int, int, int, int]]]:
    """Boxes per class name from a Pascal VOC XML file."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise EdgecellsError(f"{path}: not a readable Pascal VOC file ({exc})") from None
    out: dict[str, list[tuple[int, int, int, int]]] = {}
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            box = tuple(int(float(bb.findtext(k) or "")) for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise EdgecellsError(f"{path}: bad box for {name!r}") from None
        out.setdefault(name, []).append(box)  # type: ignore[arg-type]
    return out


def match_centres(
    centres: list[tuple[float, float]], boxes: list[tuple[int, int, int, int]]
) -> int:
    """True positives under the centre-in-box rule, one-to-one, greedy in order."""
    used: set[int] = set()
    tp = 0
    for cx, cy in centres:
        for j, (x0, y0, x1, y1) in enumerate(boxes):
            if j not in used and x0 <= cx <= x1 and y0 <= cy <= y1:
                used.add(j)
                tp += 1
                break
    return tp


@dataclass
class DetectionScore:
    """Recall/precision of one cell kind against annotated boxes."""

    n_true: int = 0
    n_pred: int = 0
    tp: int = 0

    @property
    def recall(self) -> float:
        return self.tp / self.n_true if self.n_true else 0.0

    @property
    def precision(self) -> float:
        return self.tp / self.n_pred if self.n_pred else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {
            "recall": round(self.recall, 4),
            "precision": round(self.precision, 4),
            "n_true": self.n_true,
            "n_pred": self.n_pred,
            "tp": self.tp,
        }


VOC_WBC = ("WBC",)
VOC_PLATELETS = ("Platelets", "Platelet", "PLT")


Correction = dict[str, str]


def read_corrections(path: str | Path) -> dict[tuple[str, str], list[Correction]]:
    """Annotation corrections per (data set, frame) from a corrections CSV.

    Columns: set, frame, action (``add`` or ``move``), kind (a VOC class name), the box
    (xmin..ymax) and, for ``move``, the annotated box it replaces (old_xmin..old_ymax).
    """
    import csv

    out: dict[tuple[str, str], list[Correction]] = {}
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise EdgecellsError(f"{path}: cannot read corrections ({exc.strerror})") from None
    for i, r in enumerate(rows, start=2):
        if r.get("action") not in ("add", "move") or not r.get("kind"):
            raise EdgecellsError(f"{path}:{i}: action must be add or move, with a kind")
        out.setdefault((r["set"], r["frame"]), []).append(r)
    return out


def apply_corrections(
    boxes: dict[str, list[tuple[int, int, int, int]]], corrections: list[Correction]
) -> dict[str, list[tuple[int, int, int, int]]]:
    """A copy of one frame's VOC boxes with its corrections applied."""
    out = {k: list(v) for k, v in boxes.items()}

    def box(r: Correction, prefix: str = "") -> tuple[int, int, int, int]:
        return tuple(int(r[f"{prefix}{k}"]) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[return-value]

    for r in corrections:
        kind = out.setdefault(r["kind"], [])
        if r["action"] == "move":
            old = box(r, "old_")
            if old not in kind:
                raise EdgecellsError(f"correction for {r['frame']}: no {r['kind']} box {old}")
            kind.remove(old)
        kind.append(box(r))
    return out
