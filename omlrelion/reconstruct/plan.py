"""A plan of the sums-to-map step (devices, storage, slab layout, FFT side) and what it needs to know
about the devices (their free memory)."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

from omlrelion.backend import Device
from omlrelion.geometry.grids import PaddedGrid

log = logging.getLogger(__name__)


STORAGES = ("dense", "packed")


CACHE_ENV = "OMLRELION_AUTOTUNE_CACHE"


CALIBRATION_FORMAT = 1


_INEXACT_PRIMES = ((2, 3, 5, 7), (2, 3, 5))


_INEXACT_MAX_GROWTH = 1.15          # friendly FFT sides considered: at most 15% above P


@dataclass(frozen=True)
class Plan:
    """How the sums-to-map step runs.

    n_devices : devices used (the first n of the list).
    storage : "dense": one device, whole arrays (`gridding.reconstruct_map`); "packed": the sphere's
        columns packed over n_devices devices (`columns.reconstruct_map_columns`).
    strided : packed over several devices: plane chunks and column rows dealt round-robin instead of
        in blocks.
    fft_size : side of the gridding loop's FFTs: RELION's odd P (exact), or a larger FFT-friendly
        side (differs from RELION's grid by ~4e-4 relative).
    stage_data : packed: the packed data waits in host memory during the gridding loop.
    kernel : "relion" (RELION's tabulated real-space blob; the map is RELION's on P) or "compact"
        (the blob as a Fourier-space stencil; packed only; the map does not depend on fft_size).
    convolution : "fft", or "direct" (the compact stencil applied in Fourier space; one device).
    """

    n_devices: int
    storage: str
    strided: bool
    fft_size: int
    stage_data: bool = False
    kernel: str = "relion"
    convolution: str = "fft"

    def __post_init__(self):
        if int(self.n_devices) < 1:
            raise ValueError(f"n_devices must be >= 1, got {self.n_devices}")
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {self.storage!r}")
        if self.storage == "dense" and (self.n_devices != 1 or self.stage_data or self.kernel != "relion"):
            raise ValueError("dense storage runs on one device, without host staging, with RELION's kernel")
        if self.convolution == "direct" and (self.kernel != "compact" or self.n_devices != 1
                                             or self.storage != "packed"):
            raise ValueError("the direct convolution runs the compact kernel, packed, on one device")

    @property
    def single_device_path(self) -> bool:
        """True when the plan runs `reconstruct_map` (one device, dense)."""
        return self.storage == "dense"

    def is_exact(self, grid: PaddedGrid) -> bool:
        """True when the map is the one of the plan's kernel on RELION's grid side P (an FFT on P,
        or the compact kernel, whose map does not depend on the FFT side)."""
        return self.fft_size == grid.size or self.kernel == "compact"

    def describe(self) -> str:
        """One line, e.g. '2 devices, packed, strided, fft 515'."""
        parts = [f"{self.n_devices} device" + ("s" if self.n_devices > 1 else ""), self.storage]
        if self.n_devices > 1:
            parts.append("strided" if self.strided else "contiguous")
        parts.append(f"fft {self.fft_size}")
        if self.stage_data:
            parts.append("data staged on host")
        if self.kernel != "relion":
            parts.append(f"{self.kernel} kernel")
        if self.convolution == "direct":
            parts[parts.index(f"fft {self.fft_size}")] = "direct convolution"
        return ", ".join(parts)

    def to_dict(self) -> dict:
        """JSON-ready dict (the dataclass fields)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(int(d["n_devices"]), str(d["storage"]), bool(d["strided"]), int(d["fft_size"]),
                   bool(d.get("stage_data", False)), str(d.get("kernel", "relion")), str(d.get("convolution", "fft")))


def largest_prime_factor(n: int) -> int:
    """Largest prime factor of n >= 2 (1 for n = 1)."""
    n, p, largest = int(n), 2, 1
    while p * p <= n:
        while n % p == 0:
            largest, n = p, n // p
        p += 1
    return max(largest, n) if n > 1 else largest


def _host_available_bytes() -> tuple[int, int]:
    """(MemAvailable, MemTotal) of the host in bytes, from /proc/meminfo (sysconf elsewhere)."""
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info[key] = int(value.split()[0]) * 1024
        return info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def free_memory(devices: list[Device], *, margin_fraction: float = 0.05) -> list[int]:
    """Bytes each device may use now, less a safety margin of `margin_fraction` of its total.

    GPU: `cudaMemGetInfo`'s free bytes plus the CuPy pool's cached free blocks, within the pool's
    limit when one is set. Host devices (simulated GPUs) share the host's MemAvailable: each entry
    is that shared amount.
    """
    out = []
    for dev in devices:
        if dev.gpu is None:
            free, total = _host_available_bytes()
        else:
            cp = dev.xp
            with dev.use():
                free, total = cp.cuda.runtime.memGetInfo()
                pool = cp.get_default_memory_pool()
                free += pool.free_bytes()
                limit = pool.get_limit()
                if limit:
                    free, total = min(free, limit - pool.used_bytes()), min(total, limit)
        out.append(max(int(free - margin_fraction * total), 0))
    return out


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a device or host running out of memory: MemoryError, CuPy's OutOfMemoryError,
    or cuFFT failing to allocate its work area."""
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return name == "OutOfMemoryError" or (name == "CuFFTError" and "ALLOC_FAILED" in str(exc))


def release_memory(devices: list[Device]) -> None:
    """Give back what the failed attempt cached: CuPy's memory pools and cuFFT plan caches."""
    import gc

    gc.collect()
    for dev in dict.fromkeys(devices):
        if dev.gpu is not None:
            cp = dev.xp
            with dev.use():
                cp.fft.config.get_plan_cache().clear()
                cp.get_default_memory_pool().free_all_blocks()
                cp.get_default_pinned_memory_pool().free_all_blocks()


def run_plan(plan: Plan, grid: PaddedGrid, devices: list[Device], sums: dict, *, n_iter: int = 10,
             skip_gridding: bool = False, tau2=None, tau2_fudge: float = 1.0, minres_map: int = -1, timings=None):
    """The sums-to-map step as `plan` says: the (N, N, N) map on devices[0] (or the host).

    sums : {"data": complex, "weight": real} centred half-grid sums on devices[0]. The dict is
        emptied: a packed plan packs the weight, then the data, dropping each dense array once
        packed, so the caller must hold no other reference to them to get that memory back.
    """
    from omlrelion.reconstruct.columns import ColumnEngine, reconstruct_packed
    from omlrelion.reconstruct.gridding import reconstruct_map

    devices = list(devices[:plan.n_devices])
    kwargs = {"n_iter": n_iter, "skip_gridding": skip_gridding or n_iter <= 0, "tau2": tau2,
              "tau2_fudge": tau2_fudge, "minres_map": minres_map, "timings": timings}
    with devices[0].use():
        if plan.single_device_path:
            data, weight = sums.pop("data"), sums.pop("weight")
            return reconstruct_map(data, weight, box_size=grid.box_size, pad=grid.pad, r_max=grid.r_max,
                                   nn_linear_correction=False,
                                   fft_size=None if plan.is_exact(grid) else plan.fft_size, **kwargs)
        engine = ColumnEngine(grid, devices, strided=plan.strided, fft_size=plan.fft_size, kernel=plan.kernel,
                              convolution=plan.convolution)
        fw = engine.pack_centred(sums.pop("weight"))
        packed_data = engine.pack_centred(sums.pop("data"))
        return reconstruct_packed(engine, packed_data, fw, stage_data=plan.stage_data, **kwargs)
