"""MRC maps and MRCS image stacks as float32 arrays plus a pixel size (mrcfile, strict mode).

Arrays are indexed `[z, y, x]` (x fastest, as stored). Modes read: 0 (int8), 1 (int16),
2 (float32), 6 (uint16) and 12 (float16), all converted to float32; complex modes are refused.
The pixel size read is `voxel_size.x` (`cella.x / mx`); 0.0 means the header does not say.
Writers produce mode 2 with `cella = n * angpix`, origin 0 and one label "omlrelion <version>",
and are atomic: data go to a hidden temporary file in the output folder, renamed into place
only once complete, so a failure leaves no output behind.
"""

from __future__ import annotations

import os
import secrets
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import mrcfile
import numpy as np

from omlrelion import __version__
from omlrelion.backend import REAL, to_numpy
from omlrelion.errors import InputError

__all__ = ["ImageStack", "read_map", "write_map", "write_stack", "check_output", "map_shape", "READ_MODES"]

READ_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
_HEADER_BYTES = 1024


def check_output(path: str | os.PathLike, what: str) -> Path:
    """Refuse, before any work, an output path that cannot be written: a missing or read-only
    folder, or a folder of that name. Returns the path."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{path}: cannot write the {what}: folder {folder} does not exist; create it first")
    if path.is_dir():
        raise InputError(f"{path}: cannot write the {what}: a folder of that name exists; remove it or "
                         f"choose another name")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{path}: cannot write the {what}: folder {folder} is not writable; check its "
                         f"permissions or choose another folder")
    return path


@contextmanager
def _atomic_output(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it to `path` when the block succeeds.

    The temporary name is `.<name>.<random>.tmp` in the same folder (same file system, so
    `os.replace` is atomic). On any exception the temporary file is removed; an OSError becomes
    an InputError naming `path`.
    """
    path = check_output(path, what)
    folder = path.parent
    tmp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
            raise InputError(f"{path}: cannot write the {what} ({reason}); check that folder {folder} "
                             f"is writable and has free space") from exc
        raise


def _open_error(path: Path, exc: BaseException) -> InputError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return InputError(f"{path}: not a readable MRC file ({reason}); check the path, or regenerate the file "
                      f"if it is corrupt")


def _check_header(path: str | os.PathLike, what: str):
    """Validate an MRC header against the file: existence, map ID, mode, dimensions, size.

    Returns the header (numpy record) when the file can be read.
    """
    path = Path(path)
    if not path.is_file():
        problem = "not found" if not path.exists() else "is not a file"
        raise InputError(f"{path}: {what} {problem}; check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # strict mode raises on every real problem
            with mrcfile.open(path, mode="r", permissive=False, header_only=True) as mrc:
                header = mrc.header.copy()
    except (ValueError, OSError, EOFError) as exc:
        raise _open_error(path, exc) from exc
    mode = int(header.mode)
    if mode not in READ_MODES:
        kind = " (complex data)" if mode in (3, 4) else ""
        accepted = ", ".join(f"{m} ({t})" for m, t in READ_MODES.items())
        raise InputError(f"{path}: MRC mode {mode}{kind} is not supported; accepted modes: {accepted}; "
                         f"convert it, e.g. with relion_image_handler")
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if min(nx, ny, nz) < 1:
        raise InputError(f"{path}: invalid MRC dimensions nx={nx}, ny={ny}, nz={nz} (all must be >= 1)")
    expected = (_HEADER_BYTES + int(header.nsymbt)
                + nx * ny * nz * np.dtype(READ_MODES[mode]).itemsize)
    actual = path.stat().st_size
    if actual < expected:
        raise InputError(f"{path}: truncated MRC file: the header ({nx}x{ny}x{nz}, mode {mode}) needs "
                         f"{expected} bytes, the file has {actual}; re-copy or regenerate it")
    return header


def map_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """(nz, ny, nx) of an MRC map from its header, checked as `read_map` checks it (no data read)."""
    header = _check_header(path, "map")
    return int(header.nz), int(header.ny), int(header.nx)


def map_geometry(path: str | os.PathLike) -> tuple[tuple[int, int, int], float]:
    """((nz, ny, nx), pixel size cella.x / mx in A; 0.0 when the header gives none) of an MRC map
    from its header, checked as `read_map` checks it (no data read)."""
    header = _check_header(path, "map")
    mx = int(header.mx) or int(header.nx)
    return (int(header.nz), int(header.ny), int(header.nx)), float(header.cella.x) / mx


def _check_finite(path: Path, data: np.ndarray, what: str) -> None:
    if not np.isfinite(data).all():
        bad = np.argwhere(~np.isfinite(data))[0]
        raise InputError(f"{path}: {what} contains NaN or Inf values (first at index "
                         f"{tuple(int(i) for i in bad)}, [z, y, x] order); expected finite values")


def read_map(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a 3D map (or a single 2D image) as float32.

    Parameters
    ----------
    path : str or PathLike
        MRC file (modes 0, 1, 2, 6, 12).

    Returns
    -------
    volume : float32 array, (nz, ny, nx)
        The map, indexed [z, y, x]; a 2D image comes back with nz = 1.
    angpix : float
        Pixel size `voxel_size.x` in A/px; 0.0 when the header does not give one (the caller
        decides, e.g. from an --angpix option).

    Raises
    ------
    InputError
        Missing file, not an MRC file, unsupported mode, truncated data, a stack of volumes,
        NaN/Inf voxels.
    """
    path = Path(path)
    header = _check_header(path, "map")
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "file larger than expected": RELION reads it too
            with mrcfile.open(path, mode="r", permissive=False) as mrc:
                if mrc.data.ndim > 3:
                    raise InputError(f"{path}: a stack of volumes (ispg {int(mrc.header.ispg)}) is not a "
                                     f"single map; split it first")
                volume = np.asarray(mrc.data).astype(REAL).reshape(nz, ny, nx)
                angpix = float(mrc.voxel_size.x)
    except InputError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise _open_error(path, exc) from exc
    _check_finite(path, volume, "the map")
    if not np.isfinite(angpix) or angpix < 0:
        raise InputError(f"{path}: invalid pixel size {angpix} in the header (cella / mx); fix the header, "
                         f"e.g. with relion_image_handler --force_header_angpix")
    return volume, angpix


def _check_angpix(path: Path, angpix: float) -> float:
    try:
        value = float(angpix)
    except (TypeError, ValueError):
        raise InputError(f"{path}: pixel size must be a number, got {angpix!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise InputError(f"{path}: pixel size must be > 0 A/px, got {angpix!r}")
    return value


def _write(path: str | os.PathLike, data, angpix: float, *, stack: bool) -> None:
    path = Path(path)
    what = "image stack" if stack else "map"
    angpix = _check_angpix(path, angpix)
    array = np.ascontiguousarray(to_numpy(data), dtype=REAL)
    if array.ndim != 3 or min(array.shape) < 1:
        shape = "(n, ny, nx)" if stack else "(nz, ny, nx)"
        raise InputError(f"{path}: the {what} must be a non-empty 3D array {shape}, got shape {array.shape}")
    _check_finite(path, array, f"the {what} to write")
    with _atomic_output(path, what) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.new(tmp, overwrite=False) as mrc:
                mrc.set_data(array)
                if stack:
                    mrc.set_image_stack()
                mrc.voxel_size = angpix
                mrc.header.origin.x = mrc.header.origin.y = mrc.header.origin.z = 0.0
                mrc.header.nxstart = mrc.header.nystart = mrc.header.nzstart = 0
                mrc.header.label[0] = f"omlrelion {__version__}"
                mrc.header.nlabl = 1
                mrc.update_header_stats()


def write_map(path: str | os.PathLike, volume, angpix: float) -> None:
    """Write a 3D map as float32 (mode 2), atomically.

    Parameters
    ----------
    path : str or PathLike
        Output .mrc; replaced if it exists.
    volume : float array, (nz, ny, nx)
        The map (NumPy or CuPy), indexed [z, y, x]; must be finite.
    angpix : float
        Pixel size, A/px (> 0); stored as `cella = n * angpix` so that RELION reads it back.

    Raises
    ------
    InputError
        Bad shape, non-finite voxels, bad pixel size, missing or unwritable folder.
    """
    _write(path, volume, angpix, stack=False)


def write_stack(path: str | os.PathLike, images, angpix: float) -> None:
    """Write 2D images as an MRCS image stack (mode 2, ispg 0), atomically.

    Parameters
    ----------
    path : str or PathLike
        Output .mrcs; replaced if it exists.
    images : float array, (n, ny, nx)
        Images (NumPy or CuPy), indexed [image, y, x]; must be finite.
    angpix : float
        Pixel size, A/px (> 0).

    Raises
    ------
    InputError
        Bad shape, non-finite pixels, bad pixel size, missing or unwritable folder.
    """
    _write(path, images, angpix, stack=True)


class ImageStack:
    """A memory-mapped MRCS stack of square 2D images; only the images asked for are read.

    Parameters
    ----------
    path : str or PathLike
        The .mrcs file (modes 0, 1, 2, 6, 12).

    Attributes
    ----------
    path : Path
    n_images : int
        Number of images (nz).
    box_size : int
        Image edge nx (= ny), px.
    angpix : float
        Header pixel size `voxel_size.x`, A/px; 0.0 when unknown.

    Raises
    ------
    InputError
        Missing file, not an MRC file, unsupported mode, truncated file, non-square images.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        header = _check_header(self.path, "image stack")
        nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
        if nx != ny:
            raise InputError(f"{self.path}: images must be square, got nx={nx}, ny={ny}; re-extract the "
                             f"particles in square boxes")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "file larger than expected" is tolerated
                self._mrc = mrcfile.mmap(self.path, mode="r", permissive=False)
        except (ValueError, OSError, EOFError) as exc:
            raise _open_error(self.path, exc) from exc
        self._data = self._mrc.data.reshape(nz, ny, nx)
        self.n_images = nz
        self.box_size = nx
        self.angpix = float(self._mrc.voxel_size.x)

    def read(self, indices: int | Sequence[int] | np.ndarray) -> np.ndarray:
        """Read images by 0-based index.

        Parameters
        ----------
        indices : int or int array, (k,)
            0-based image indices (the STAR file's `k@stack` minus one); any order, repeats allowed.

        Returns
        -------
        float32 array, (k, box_size, box_size)
            The images, indexed [image, y, x].

        Raises
        ------
        InputError
            Index out of range (named 1-based, as written in STAR files) or NaN/Inf in an image.
        """
        if self._mrc is None:
            raise ValueError(f"{self.path}: the image stack is closed")
        index = np.atleast_1d(np.asarray(indices))
        if index.ndim != 1 or (index.size and not np.issubdtype(index.dtype, np.integer)):
            raise InputError(f"{self.path}: image indices must be a 1D sequence of integers, got {indices!r}")
        index = index.astype(np.int64)
        bad = (index < 0) | (index >= self.n_images)
        if bad.any():
            first = int(index[bad][0])
            raise InputError(f"{self.path}: image {first + 1} (1-based, as in k@stack) is out of range: "
                             f"the stack holds {self.n_images} images; fix k in rlnImageName (k@stack)")
        try:
            if index.size > 1 and np.all(np.diff(index) == 1):   # a run of images: one block copy
                images = np.array(self._data[index[0]:index[-1] + 1], dtype=REAL)
            else:
                images = np.asarray(self._data[index]).astype(REAL, copy=False)
        except (ValueError, OSError) as exc:
            raise _open_error(self.path, exc) from exc
        finite = np.isfinite(images).all(axis=(1, 2))
        if not finite.all():
            first = int(index[~finite][0])
            raise InputError(f"{self.path}: image {first + 1} (1-based) contains NaN or Inf values; expected "
                             f"finite pixels: re-extract the particles or remove that image from the STAR file")
        return images

    def close(self) -> None:
        """Release the memory map (idempotent)."""
        if self._mrc is not None:
            self._data = None
            self._mrc.close()
            self._mrc = None

    def __enter__(self) -> ImageStack:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ImageStack({str(self.path)!r}, n_images={self.n_images}, box_size={self.box_size})"
