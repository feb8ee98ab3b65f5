"""Lossless compressed storage of Fourier-space arrays (see `compress.sphere`)."""

from omlrelion.compress.sphere import (PackingTables, SpherePacking, check_outside_zero, dense_bytes,
                                       footprint_report, pack, packed_bytes, packed_frequencies, packed_r2,
                                       packed_rows_view, unpack)

__all__ = [
    "SpherePacking", "PackingTables", "pack", "unpack", "check_outside_zero", "packed_rows_view",
    "packed_frequencies", "packed_r2", "dense_bytes", "packed_bytes", "footprint_report",
]
