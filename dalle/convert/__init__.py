"""Converters from other projects' released weights to model folders of this package.

Every converter reads its input with :mod:`dalle.convert.safe_pickle` (no code from the
file runs) and writes safetensors and a JSON config, plus ``converted.json`` saying
what the folder was converted from (``dalle info --model`` shows it).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

PROVENANCE_NAME = "converted.json"


def record_conversion(folder: str | Path, kind: str, sources: dict[str, str | Path], **details: object) -> Path:
    """Write ``folder/converted.json``: what was converted, from which files (names and SHA-256)."""
    from dalle import __version__
    from dalle.io import atomic_write, file_sha256

    record = {
        "converted_from": kind,
        "sources": {role: {"file": Path(p).name, "sha256": file_sha256(p)} for role, p in sources.items()},
        "converted_by": f"dalle {__version__}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **details,
    }
    path = Path(folder) / PROVENANCE_NAME
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return path


def read_conversion(folder: str | Path) -> dict | None:
    """The ``converted.json`` record of a component folder, or None for a folder trained here."""
    path = Path(folder) / PROVENANCE_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None
