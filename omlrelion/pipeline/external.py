"""relion_refine's external M-step: reconstruct the sums RELION hands over, as RELION would.

RELION 3.1 (`relion_refine --external_reconstruct`, program named by
RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE) writes, per class and half set, three float32 MRC files
(data real/imaginary part and weight; rfft layout of the padded Q^3 grid, Q = round(pad N), DC at
[0, 0, 0], non-zero for |k| <= round(pad r_max), already Hermitian-repaired and symmetrised) and a
STAR file naming them, the output map, the padding factor, the original and current image size,
the tau^2 fudge factor and tau^2 per shell; it then runs `<program> <that STAR file>` and reads the
real-space N^3 map back (see docs/relion-external-reconstruct.md). What RELION's own
relion_external_reconstruct does with them is reproduced here: the sums go back onto the centred
padded grid (|k|^2 < R^2), then `reconstruct_map` with the MAP term from tau^2 (all shells) and 10
gridding iterations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omlrelion.backend import Device, to_numpy
from omlrelion.errors import InputError
from omlrelion.geometry.grids import PaddedGrid
from omlrelion.io.mrc import read_map, write_map
from omlrelion.io.star import read_star_table
from omlrelion.reconstruct.gridding import reconstruct_map
from omlrelion.units import relion_round

GENERAL_LABELS = ("rlnExtReconsDataReal", "rlnExtReconsDataImag", "rlnExtReconsWeight", "rlnExtReconsResult",
                  "rlnPaddingFactor", "rlnOriginalImageSize", "rlnCurrentImageSize")


@dataclass(frozen=True)
class ExternalRequest:
    """What one external-reconstruct STAR file asks for (paths resolved against the cwd, as RELION's)."""

    data_real: Path
    data_imag: Path
    weight: Path
    result: Path
    pad: float
    box_size: int
    current_size: int
    tau2_fudge: float
    tau2: np.ndarray
    dimensionality: int


def read_request(star_path) -> ExternalRequest:
    star_path = Path(star_path)
    general = read_star_table(star_path, block="external_reconstruct_general", required=GENERAL_LABELS)
    row = general.iloc[0]
    dim = int(row["rlnReferenceDimensionality"]) if "rlnReferenceDimensionality" in general else 3
    if dim != 3:
        raise InputError(f"{star_path}: rlnReferenceDimensionality {dim}: only 3D references are supported")
    tau2_table = read_star_table(star_path, block="external_reconstruct_tau2",
                                 required=("rlnSpectralIndex", "rlnReferenceTau2"))
    idx = tau2_table["rlnSpectralIndex"].to_numpy().astype(int)
    tau2 = np.zeros(idx.max() + 1)
    tau2[idx] = tau2_table["rlnReferenceTau2"].to_numpy(dtype=np.float64)
    fudge = float(row["rlnTau2FudgeFactor"]) if "rlnTau2FudgeFactor" in general else 1.0
    req = ExternalRequest(Path(str(row["rlnExtReconsDataReal"])), Path(str(row["rlnExtReconsDataImag"])),
                          Path(str(row["rlnExtReconsWeight"])), Path(str(row["rlnExtReconsResult"])),
                          float(row["rlnPaddingFactor"]), int(row["rlnOriginalImageSize"]),
                          int(row["rlnCurrentImageSize"]), fudge, tau2, dim)
    if req.pad < 1 or req.box_size < 2 or not 0 < req.current_size <= req.box_size:
        raise InputError(f"{star_path}: inconsistent sizes (pad {req.pad}, original {req.box_size}, "
                         f"current {req.current_size})")
    return req


def _to_centred(volume_ft, grid: PaddedGrid):
    """rfft-layout (Q, Q, Q//2+1) sums -> projector-centred (P, P, P//2+1), kept where |k|^2 < R^2."""
    q = volume_ft.shape[0]
    c = grid.size // 2
    k = np.arange(-c, c + 1)
    rows = k % q
    kx = min(grid.half, volume_ft.shape[2])
    out = np.zeros(grid.shape, dtype=volume_ft.dtype)
    out[:, :, :kx] = volume_ft[rows[:, None], rows[None, :], :kx]
    r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(grid.half)[None, None, :] ** 2
    out[(r2 >= grid.r2_sphere) | (np.abs(k)[:, None, None] > q // 2) | (np.abs(k)[None, :, None] > q // 2)] = 0
    return out


def external_reconstruct(star_path, *, device: Device = Device(), n_iter: int = 10, skip_gridding: bool = False,
                         use_map: bool = True, precision: str | None = None) -> dict:
    """Answer one relion_refine external-reconstruct request: write the map it asks for."""
    t0 = time.perf_counter()
    req = read_request(star_path)
    arrays = []
    for path in (req.data_real, req.data_imag, req.weight):
        volume, _ = read_map(path)
        arrays.append(volume)
    q = relion_round(req.pad * req.box_size)
    expected = (q, q, q // 2 + 1)
    for path, a in zip((req.data_real, req.data_imag, req.weight), arrays):
        if a.shape != expected:
            raise InputError(f"{path}: shape {a.shape}, expected {expected} for box {req.box_size} and pad {req.pad}")
    grid = PaddedGrid(req.box_size, req.pad, req.current_size // 2)
    precision = precision or ("double" if device.gpu is None else "single")
    real = np.float64 if precision == "double" else np.float32
    data = _to_centred(arrays[0].astype(real) + 1j * arrays[1].astype(real), grid)
    weight = _to_centred(arrays[2].astype(real), grid)
    with device.use():
        volume = reconstruct_map(device.put(data), device.put(weight), box_size=req.box_size, pad=req.pad,
                                 r_max=grid.r_max, n_iter=n_iter, skip_gridding=skip_gridding,
                                 tau2=req.tau2 if use_map else None, tau2_fudge=req.tau2_fudge, minres_map=-1)
        volume = to_numpy(volume).astype(np.float32)
    write_map(req.result, volume, 1.0)   # RELION ignores the header's pixel size here
    return {"result": str(req.result), "box_size": req.box_size, "current_size": req.current_size,
            "pad": req.pad, "seconds": time.perf_counter() - t0}
