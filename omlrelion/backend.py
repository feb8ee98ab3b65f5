"""Array backends and devices: the only module that imports CuPy.

The data decide the backend: library functions call `get_xp(*arrays)` and never read a global.
Only `pipeline/` (and tests) decide where data live, through `Device`. A list of N host Devices
stands in for N GPUs so multi-device code runs, and is tested, without a GPU.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

try:  # CPU-only installs run everything on NumPy
    import cupy as cp
except Exception:  # ImportError, or a CuPy without a usable CUDA runtime
    cp = None

REAL = np.float32
COMPLEX = np.complex64
Array = Any  # numpy.ndarray or cupy.ndarray


def get_xp(*arrays):
    """numpy or cupy, decided by the arrays passed in."""
    if cp is None:
        return np
    return cp.get_array_module(*arrays)


def is_gpu_array(a) -> bool:
    return cp is not None and isinstance(a, cp.ndarray)


def to_numpy(a):
    """A host copy (or the array itself when it already lives on the host)."""
    return cp.asnumpy(a) if is_gpu_array(a) else np.asarray(a)


def gpu_count() -> int:
    if cp is None:
        return 0
    try:
        return int(cp.cuda.runtime.getDeviceCount())
    except Exception:  # no driver or no device
        return 0


@dataclass(frozen=True)
class Device:
    """Where arrays live: gpu=None is the host; N host Devices stand in for N GPUs."""

    gpu: int | None = None

    @property
    def xp(self):
        return np if self.gpu is None else cp

    @property
    def name(self) -> str:
        if self.gpu is None:
            return "cpu"
        props = cp.cuda.runtime.getDeviceProperties(self.gpu)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    def use(self):
        """`with dev.use():` makes this device current (no-op on the host)."""
        return nullcontext() if self.gpu is None else cp.cuda.Device(self.gpu)

    def put(self, a):
        """Copy `a` onto this device (no copy when it is already there)."""
        if self.gpu is None:
            return to_numpy(a)
        with self.use():
            return cp.asarray(a)

    def free_bytes(self) -> int | None:
        """Memory a new allocation can get on this GPU (the driver's free bytes plus the CuPy pool's
        unused blocks); None on the host."""
        if self.gpu is None:
            return None
        with self.use():
            free, _ = cp.cuda.runtime.memGetInfo()
            return int(free + cp.get_default_memory_pool().free_bytes())

    def synchronize(self) -> None:
        if self.gpu is not None:
            with self.use():
                cp.cuda.Device(self.gpu).synchronize()


def parse_device(spec: str) -> list[Device]:
    """'cpu', 'cpu:4' (four simulated host devices), 'gpu' (GPU 0), 'gpu:0,1', 'gpu:all'."""
    from omlrelion.errors import InputError

    spec = spec.strip().lower()
    kind, _, rest = spec.partition(":")
    if kind == "cpu":
        if rest and not rest.isdigit():
            raise InputError(f"--device {spec!r}: expected cpu or cpu:N with N a positive integer")
        if rest and int(rest) < 1:
            raise InputError(f"--device {spec!r}: the number of simulated devices must be >= 1")
        return [Device()] * (int(rest) if rest else 1)
    if kind == "gpu":
        ids = None                       # gpu (GPU 0) or gpu:all
        if rest not in ("", "all"):
            try:
                ids = [int(t) for t in rest.split(",") if t != ""]
            except ValueError:
                raise InputError(f"--device {spec!r}: expected gpu, gpu:all or gpu:ID[,ID...]") from None
        available = gpu_count()
        if available == 0:
            raise InputError(f"--device {spec!r}: no CUDA GPU is visible (is CuPy installed?); use --device cpu")
        if ids is None:
            ids = list(range(available)) if rest == "all" else [0]
        if not ids or any(not 0 <= i < available for i in ids) or len(set(ids)) != len(ids):
            raise InputError(
                f"--device {spec!r}: GPU ids must be distinct and in 0..{available - 1} ({available} visible)")
        return [Device(i) for i in ids]
    raise InputError(f"--device {spec!r}: expected cpu, cpu:N, gpu, gpu:all or gpu:ID[,ID...]")


def memory_report(device: Device) -> dict:
    """Memory in use on `device`, in bytes.

    GPU: `pool_bytes` is the CuPy pool's size (it keeps freed blocks, so it is the high-water
    mark of what CuPy held) and `driver_used_bytes` the driver's total minus free. Host: the
    process's peak resident set size.
    """
    if device.gpu is None:
        import resource

        return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    with device.use():
        free, total = cp.cuda.runtime.memGetInfo()
        return {"pool_bytes": int(cp.get_default_memory_pool().total_bytes()),
                "driver_used_bytes": int(total - free), "total_bytes": int(total)}


class _HostFFT:
    """scipy.fft with all host cores (numpy.fft's pocketfft runs on one); same call signatures."""

    def __getattr__(self, name):
        import os
        from functools import partial

        import scipy.fft

        return partial(getattr(scipy.fft, name), workers=os.cpu_count() or 1)


_HOST_FFT = _HostFFT()


def fft_module(xp):
    """The FFT namespace for arrays of backend `xp`: cupy.fft, or multi-threaded scipy.fft on the host."""
    return _HOST_FFT if xp is np else xp.fft
