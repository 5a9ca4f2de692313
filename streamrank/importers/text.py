"""Reading the public logs as they ship: plain or gzip-compressed text."""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Any

Event = dict[str, Any]


def open_text(path: Path) -> io.TextIOBase:
    """Open a text file, gzip-compressed or not (``name`` or ``name.gz``)."""
    if not path.exists() and path.with_name(path.name + ".gz").exists():
        path = path.with_name(path.name + ".gz")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8")
    return path.open(encoding="utf-8")
