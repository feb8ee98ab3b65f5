"""JSON summaries and caches, written atomically (temporary file in the same folder + rename)."""

from __future__ import annotations

import json

from omlrelion.io.mrc import _atomic_output


def write_json(path, record, **dump_options) -> None:
    """Write `record` as JSON to `path`; a failure leaves no partial file behind.

    Raises InputError naming `path` for a missing or unwritable folder, or a folder of that name.
    """
    with _atomic_output(path, "JSON file") as tmp, open(tmp, "x") as f:
        json.dump(record, f, **dump_options)
