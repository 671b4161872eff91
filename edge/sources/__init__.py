"""Frame sources: one tiny protocol (:mod:`.base`), one file per kind, URIs in :mod:`.uri`.

>>> from edgecells.edge.sources import open_source
>>> with open_source("path/to/frames/") as src:
...     for frame in src:
...         frame.index, frame.timestamp, frame.image
"""

from edgecells.edge.sources.base import CameraLost, Frame, ReopeningSource
from edgecells.edge.sources.uri import open_source, parse_uri

__all__ = ["CameraLost", "Frame", "ReopeningSource", "open_source", "parse_uri"]
