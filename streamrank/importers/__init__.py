"""Converters from public logs to the native event log (JSON Lines, time order).

Each importer takes the log's folder (or file) and yields events of the
contract with a ``stream`` field naming their topic, ready for ``streamrank
replay`` or for producing to Kafka. One module per source format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from streamrank.importers.mind import import_mind
from streamrank.importers.obd import import_obd
from streamrank.importers.sessions import import_diginetica, import_yoochoose
from streamrank.importers.text import Event

IMPORTERS: dict[str, Callable[[Path], Iterator[Event]]] = {
    "mind": import_mind,
    "obd": import_obd,
    "yoochoose": import_yoochoose,
    "diginetica": import_diginetica,
}

__all__ = [
    "IMPORTERS",
    "Event",
    "import_diginetica",
    "import_mind",
    "import_obd",
    "import_yoochoose",
]
