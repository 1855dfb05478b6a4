"""Tiny generated datasets in each layout the data module reads (tests only)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(value: int = 0, size: int = 4) -> bytes:
    """A tiny RGB PNG whose pixels are ``value``."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value % 256, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


_BLOB = png_bytes(128)


def image(path: Path, blob: bytes = _BLOB) -> Path:
    """Write one tiny image at ``path`` (parents created); return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return path


def domainbed(root: Path, counts: dict[str, dict[str, int]], suffix: str = ".png") -> Path:
    """``root/<domain>/<class>/<i>.png`` with ``counts[domain][class]`` images each."""
    for domain, classes in counts.items():
        for name, n in classes.items():
            (root / domain / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image(root / domain / name / f"img{i:03d}{suffix}")
    return root


def write_list(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path
