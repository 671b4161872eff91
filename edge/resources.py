"""Files shipped inside the package (``edge/data/``), found through one place.

Host packages (convert, training) use these functions rather than building paths into
``edge/data`` themselves.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SAMPLES_DIR = DATA_DIR / "samples"  # three BCCD frames: the default source of `screen`
REFERENCE_BUNDLE_DIR = DATA_DIR / "bundles" / "reference"  # the shipped default bundle


def sample_frames() -> list[Path]:
    """The shipped sample frames (sorted), or [] where the folder is absent."""
    from edgecells.edge.imageio import list_images

    return list_images(SAMPLES_DIR) if SAMPLES_DIR.is_dir() else []
