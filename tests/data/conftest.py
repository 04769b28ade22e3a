"""Fixtures for the data tests: tiny JPEG trees (the digits .beton files come from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest


# Solid colours, one per class: pixel content identifies the label after a round trip.
CLASS_COLOURS = np.array([[220, 30, 30], [30, 200, 40], [20, 40, 230]], dtype=np.uint8)


def write_colour_tree(root: Path, per_class: int = 4, size: tuple[int, int] = (40, 30)) -> Path:
    """An ImageFolder tree of solid-colour JPEGs (w x h = ``size``), one colour per class."""
    for label, colour in enumerate(CLASS_COLOURS):
        folder = root / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = size[0] + 2 * i, size[1]  # varying widths, as in real folders
            image = np.broadcast_to(colour, (h, w, 3)).copy()
            ok, data = cv2.imencode(".jpg", image[:, :, ::-1], [int(cv2.IMWRITE_JPEG_QUALITY), 95])
            assert ok
            (folder / f"img{i}.jpg").write_bytes(data.tobytes())
    return root


@pytest.fixture()
def class_colours() -> np.ndarray:
    return CLASS_COLOURS


@pytest.fixture()
def colour_tree(tmp_path) -> Path:
    return write_colour_tree(tmp_path / "images")
