"""JSON summaries and caches, written atomically (temporary file in the same folder + rename)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json(path, record, **dump_options) -> None:
    """Write `record` as JSON to `path`; a failure leaves no partial file behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, **dump_options)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
