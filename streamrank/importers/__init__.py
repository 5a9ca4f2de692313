"""Converters from public logs to the native event log (JSON Lines, time order).

Each importer takes the log's folder (or file) and yields events of the
contract with a ``stream`` field naming their topic, ready for ``streamrank
replay`` or for producing to Kafka. One module per source format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from streamrank.importers.mind import import_mind
from streamrank.importers.text import Event

IMPORTERS: dict[str, Callable[[Path], Iterator[Event]]] = {
    "mind": import_mind,
}

__all__ = ["IMPORTERS", "Event", "import_mind"]
