"""HDF5 stores between workflow jobs: particles, Fourier sums, volumes, pose tables.

The only module that imports h5py and hdf5plugin. Every dataset is chunked, compressed losslessly
(Zstd with byte or bit shuffle, or Blosc2/Zstd with its own shuffle, through hdf5plugin) and
checksummed (Fletcher32, computed on the compressed chunk, so a flipped bit on disk is an error,
never a silently wrong number). Complex arrays are stored as two float planes (`<name>_real`,
`<name>_imag`), which compress better than interleaved pairs; reading gives back the same bits.

Root attributes: `kind` (particles | sums | volume | poses), `format_version`,
`omlrelion_version`, `config_hash` (of the options that produced the file), `box_size`, `angpix`,
and per kind `pad`, `r_max`, `iteration`, `half`, `shard`. Readers check `kind` and
`format_version` always, and any attribute the caller expects (`expect={...}`), and raise
`InputError` naming the file on a mismatch, a missing attribute, a checksum failure or a
truncated file; `verify_file` reads every chunk of a file (the workflow's check at start).
Writers are atomic: a hidden temporary file in the output folder, renamed into place when
complete (`os.replace`), so an interrupted job leaves nothing a rerun would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from omlrelion import __version__
from omlrelion.ctf.optics import Optics
from omlrelion.errors import InputError
from omlrelion.io.mrc import _atomic_output

__all__ = ["Compression", "ParticleStore", "ParticleStoreWriter", "config_hash", "write_sums", "read_sums", "read_noise",
           "write_volume", "read_volume", "write_table", "read_table", "read_attrs", "compression_report",
           "verify_file", "FORMAT_VERSION", "KINDS"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("particles", "sums", "volume", "poses")
CHUNK_BYTES = 1 << 20  # about 1 MiB of raw data per chunk
CODECS = ("zstd", "blosc2", "none")
SHUFFLES = ("byte", "bit")


@dataclass(frozen=True)
class Compression:
    """Lossless filter pipeline of every dataset: codec, level and shuffle.

    codec "zstd": HDF5 shuffle (byte) or the Bitshuffle filter (bit) + Zstd; "blosc2": Blosc2 with
    its Zstd codec and its own byte or bit shuffle; "none": chunked and checksummed only.
    """

    codec: str = "zstd"
    level: int = 5
    shuffle: str = "byte"

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise InputError(f"store codec {self.codec!r}: expected one of {', '.join(CODECS)}")
        if self.shuffle not in SHUFFLES:
            raise InputError(f"store shuffle {self.shuffle!r}: expected one of {', '.join(SHUFFLES)}")
        if isinstance(self.level, bool) or not isinstance(self.level, int) or not 1 <= self.level <= 9:
            raise InputError(f"store level {self.level!r}: expected an integer 1..9")

    def filters(self) -> dict:
        """Keyword arguments of `h5py.Group.create_dataset` (Fletcher32 is always added)."""
        if self.codec == "none":
            return {}
        if self.codec == "zstd":
            if self.shuffle == "bit":
                return dict(hdf5plugin.Bitshuffle(cname="zstd", clevel=self.level))
            return dict(shuffle=True, **hdf5plugin.Zstd(clevel=self.level))
        flt = hdf5plugin.Blosc2.BITSHUFFLE if self.shuffle == "bit" else hdf5plugin.Blosc2.SHUFFLE
        return dict(hdf5plugin.Blosc2(cname="zstd", clevel=self.level, filters=flt))


def config_hash(options: dict) -> str:
    """sha256 (16 hex digits) of the options' canonical JSON: the provenance of a file."""
    text = json.dumps(options, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...] | None:
    """Slabs along the first axis of about CHUNK_BYTES each."""
    if not shape or 0 in shape:
        return None
    row = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    return (max(1, min(shape[0], CHUNK_BYTES // max(row, 1))),) + tuple(shape[1:])


def _create(group, name: str, data=None, *, shape=None, dtype=None, compression: Compression):
    shape = tuple(np.shape(data)) if data is not None else tuple(shape)
    dtype = np.asarray(data).dtype if data is not None else np.dtype(dtype)
    if not shape or 0 in shape:  # scalars and empty arrays cannot be chunked
        return group.create_dataset(name, data=data, shape=shape, dtype=dtype)
    return group.create_dataset(name, data=data, shape=shape, dtype=dtype, fletcher32=True,
                                chunks=_chunks(shape, dtype.itemsize), **compression.filters())


def _put_array(group, name: str, array, compression: Compression) -> None:
    a = np.asarray(array)
    if np.iscomplexobj(a):
        _create(group, name + "_real", np.ascontiguousarray(a.real), compression=compression)
        _create(group, name + "_imag", np.ascontiguousarray(a.imag), compression=compression)
    else:
        _create(group, name, a, compression=compression)


def _get_array(path: Path, group, name: str) -> np.ndarray:
    try:
        if name in group:
            return group[name][()]
        if name + "_real" in group:
            re, im = group[name + "_real"][()], group[name + "_imag"][()]
            out = np.empty(re.shape, dtype=np.result_type(re.dtype, np.complex64))
            out.real, out.imag = re, im
            return out
    except (OSError, KeyError, ValueError) as exc:
        raise _corrupt(path, exc) from exc
    raise InputError(f"{path}: dataset {name!r} missing; the file is not a complete omlrelion store")


def _corrupt(path: Path, exc: BaseException) -> InputError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = " (checksum mismatch: the file is corrupt)" if _checksum_failure(exc) else ""
    return InputError(f"{path}: cannot read the HDF5 store{hint}: {reason}; delete it so that the workflow "
                      f"rebuilds it")


def _checksum_failure(exc: BaseException) -> bool:
    """A chunk failed its read filters: with Fletcher32 on every chunk, a checksum mismatch."""
    text = str(exc).lower()
    return "fletcher" in text or "filter returned failure" in text


def verify_file(path) -> str | None:
    """Read every chunk of every dataset of an HDF5 file, which checks its Fletcher32 checksums.

    Returns None when the file reads back completely, else one line of why: "checksum mismatch in
    dataset ..." or "unreadable HDF5 file (...)" (truncated, not HDF5, damaged metadata). Memory:
    one chunk (about 1 MiB) at a time.
    """
    path = Path(path)
    name = None
    try:
        with h5py.File(path, "r", locking=False) as f:
            for ds in _datasets(f):
                name = ds.name
                if ds.chunks is None:
                    ds[()]
                else:
                    for sel in ds.iter_chunks():
                        ds[sel]
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if _checksum_failure(exc):
            return f"checksum mismatch in dataset {name} ({reason})"
        return f"unreadable HDF5 file ({reason})"
    return None


def _clean_attr(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


@contextmanager
def _open_write(path, kind: str, attrs: dict):
    with _atomic_output(path, f"{kind} store") as tmp:
        with h5py.File(tmp, "w", locking=False) as f:
            f.attrs["kind"] = kind
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["omlrelion_version"] = __version__
            for key, value in attrs.items():
                if value is None:
                    continue
                f.attrs[key] = value
            yield f


def _check_attrs(path: Path, attrs: dict, kind: str, expect: dict | None) -> None:
    found = attrs.get("kind")
    if found != kind:
        raise InputError(f"{path}: an omlrelion {kind} store was expected, found kind {found!r}")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: store format version {attrs.get('format_version')!r}, this omlrelion "
                         f"reads version {FORMAT_VERSION}; delete the file so that the workflow rebuilds it")
    if attrs.get("omlrelion_version") != __version__:
        log.warning("%s was written by omlrelion %s (this is %s)", path, attrs.get("omlrelion_version"),
                    __version__)
    for key, want in (expect or {}).items():
        if key not in attrs:
            raise InputError(f"{path}: attribute {key!r} missing (expected {want!r})")
        got = attrs[key]
        same = (math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-12)
                if isinstance(want, float) and isinstance(got, (int, float)) else got == want)
        if not same:
            raise InputError(f"{path}: attribute {key} is {got!r}, expected {want!r} (a file from another "
                             f"run or configuration; rerun the job that writes it)")


@contextmanager
def _open_read(path, kind: str, expect: dict | None):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {kind} store not found" if not path.exists() else f"{path}: not a file")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise _corrupt(path, exc) from exc
    try:
        attrs = {k: _clean_attr(v) for k, v in f.attrs.items()}
        _check_attrs(path, attrs, kind, expect)
        yield f, attrs
    finally:
        f.close()


def read_attrs(path) -> dict:
    """The root attributes of any omlrelion store (no checks beyond a readable file)."""
    path = Path(path)
    try:
        with h5py.File(path, "r", locking=False) as f:
            return {k: _clean_attr(v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise _corrupt(path, exc) from exc


# --------------------------------------------------------------------------- particles
class ParticleStoreWriter:
    """Write a particle store image batch by image batch; `close()` renames it into place.

    Use as a context manager: an exception inside the block leaves no file behind.
    Layout: `/images` float32 (n, box, box) [image, y, x]; `/particles/<column>` arrays of length
    n; attribute `optics` (JSON list of the optics groups, 0-based index = column optics_group).
    """

    def __init__(self, path, *, n_particles: int, box_size: int, angpix: float, optics: list[Optics],
                 attrs: dict, compression: Compression) -> None:
        self.path = Path(path)
        self._ctx = _open_write(self.path, "particles", {
            **attrs, "box_size": int(box_size), "angpix": float(angpix), "n_particles": int(n_particles),
            "optics": json.dumps([asdict(o) for o in optics])})
        self._file = None
        self._shape = (int(n_particles), int(box_size), int(box_size))
        self._compression = compression

    def __enter__(self) -> ParticleStoreWriter:
        self._file = self._ctx.__enter__()
        self._images = _create(self._file, "images", shape=self._shape, dtype=np.float32,
                               compression=self._compression)
        return self

    def write_images(self, start: int, images) -> None:
        """Images [start, start + len(images)) as float32 (k, box, box)."""
        images = np.asarray(images, dtype=np.float32)
        self._images[start:start + len(images)] = images

    def write_columns(self, columns: dict[str, np.ndarray]) -> None:
        """Per-particle arrays (first axis n) under /particles."""
        group = self._file.require_group("particles")
        for name, values in columns.items():
            values = np.asarray(values)
            if len(values) != self._shape[0]:
                raise ValueError(f"column {name}: {len(values)} rows for {self._shape[0]} particles")
            _create(group, name, values, compression=self._compression)

    def __exit__(self, *exc_info):
        self._file = None
        return self._ctx.__exit__(*exc_info)


class ParticleStore:
    """Read a particle store; images are read only as asked (increasing indices are fastest)."""

    def __init__(self, path, *, expect: dict | None = None) -> None:
        self.path = Path(path)
        self._ctx = _open_read(self.path, "particles", expect)
        self._file, self.attrs = self._ctx.__enter__()
        try:
            self.n_particles = int(self.attrs["n_particles"])
            self.box_size = int(self.attrs["box_size"])
            self.angpix = float(self.attrs["angpix"])
            self.optics = [Optics(**o) for o in json.loads(self.attrs["optics"])]
            images = self._file["images"]
        except (KeyError, TypeError, ValueError) as exc:
            self.close()
            raise InputError(f"{self.path}: incomplete particle store ({exc})") from exc
        if images.shape != (self.n_particles, self.box_size, self.box_size):
            self.close()
            raise InputError(f"{self.path}: images have shape {images.shape}, attributes say "
                             f"{(self.n_particles, self.box_size, self.box_size)}")
        self._images = images

    def column(self, name: str) -> np.ndarray:
        """The per-particle array `name` (e.g. eulers_deg, half, shard), all n rows."""
        return _get_array(self.path, self._file["particles"], name)

    def read_images(self, indices) -> np.ndarray:
        """float32 (k, box, box) images at 0-based `indices` (any order)."""
        index = np.asarray(indices, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.n_particles):
            raise InputError(f"{self.path}: particle index out of range 0..{self.n_particles - 1}")
        order = np.argsort(index, kind="stable")
        uniq, inverse = np.unique(index[order], return_inverse=True)
        try:
            block = self._images[uniq] if uniq.size else np.zeros((0,) + self._images.shape[1:], np.float32)
        except (OSError, ValueError) as exc:
            raise _corrupt(self.path, exc) from exc
        out = np.empty((len(index),) + block.shape[1:], dtype=np.float32)
        out[order] = block[inverse]
        return out

    def close(self) -> None:
        if self._file is not None:
            self._ctx.__exit__(None, None, None)
            self._file = None

    def __enter__(self) -> ParticleStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# --------------------------------------------------------------------------- sums, volumes, tables
def write_sums(path, data_ftc, weight_ftc, *, attrs: dict, compression: Compression, noise: dict | None = None) -> None:
    """Padded Fourier sums (data complex, weight real; (P, P, P//2+1)) with their attributes.

    attrs must hold box_size, pad, r_max, angpix and iteration (and half, shard, n_particles...).
    noise: the pose search's other sums (name -> array or number; group /noise), added up by merges.
    """
    for key in ("box_size", "pad", "r_max", "angpix", "iteration"):
        if key not in attrs:
            raise ValueError(f"write_sums: attribute {key} is required")
    data, weight = np.asarray(data_ftc), np.asarray(weight_ftc)
    if data.shape != weight.shape:
        raise ValueError(f"data {data.shape} and weight {weight.shape} differ in shape")
    with _open_write(path, "sums", attrs) as f:
        _put_array(f, "data", data, compression)
        _put_array(f, "weight", weight, compression)
        if noise:
            group = f.create_group("noise")
            for name in sorted(noise):
                _put_array(group, name, np.asarray(noise[name]), compression)


def read_sums(path, *, expect: dict | None = None):
    """(data, weight, attrs): the arrays exactly as written and the root attributes."""
    with _open_read(path, "sums", expect) as (f, attrs):
        return _get_array(Path(path), f, "data"), _get_array(Path(path), f, "weight"), attrs


def read_noise(path, *, expect: dict | None = None) -> dict:
    """The /noise sums of a sums store (name -> array; 0-d for numbers), {} when it has none."""
    with _open_read(path, "sums", expect) as (f, _):
        if "noise" not in f:
            return {}
        group = f["noise"]
        names = sorted({k.removesuffix("_real").removesuffix("_imag") for k in group})
        return {name: _get_array(Path(path), group, name) for name in names}


def write_volume(path, volume, *, attrs: dict, compression: Compression) -> None:
    """A real (N, N, N) map, indexed [z, y, x]; attrs must hold box_size and angpix."""
    for key in ("box_size", "angpix"):
        if key not in attrs:
            raise ValueError(f"write_volume: attribute {key} is required")
    with _open_write(path, "volume", attrs) as f:
        _put_array(f, "volume", np.asarray(volume), compression)


def read_volume(path, *, expect: dict | None = None):
    """(volume, attrs)."""
    with _open_read(path, "volume", expect) as (f, attrs):
        return _get_array(Path(path), f, "volume"), attrs


def write_table(path, columns: dict[str, np.ndarray], *, kind: str = "poses", attrs: dict,
                compression: Compression) -> None:
    """Named arrays of equal length (a pose table: index, eulers_deg, shifts_px, ...)."""
    lengths = {name: len(np.asarray(v)) for name, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns differ in length: {lengths}")
    with _open_write(path, kind, attrs) as f:
        group = f.create_group("columns")
        for name, values in columns.items():
            _put_array(group, name, values, compression)


def read_table(path, *, kind: str = "poses", expect: dict | None = None):
    """(columns, attrs)."""
    with _open_read(path, kind, expect) as (f, attrs):
        group = f["columns"]
        names = sorted({n[:-5] if n.endswith(("_real", "_imag")) else n for n in group})
        return {n: _get_array(Path(path), group, n) for n in names}, attrs


def _datasets(group) -> Iterable:
    for obj in group.values():
        if isinstance(obj, h5py.Dataset):
            yield obj
        elif isinstance(obj, h5py.Group):
            yield from _datasets(obj)


def compression_report(path) -> dict:
    """Raw size of the float arrays (float32 in the workflow's stores) against their size on disk.

    Returns kind, raw_bytes (items x itemsize of every float dataset; complex arrays are two float
    planes), stored_bytes (their compressed chunks on disk), file_bytes and
    ratio = raw_bytes / stored_bytes.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r", locking=False) as f:
            raw = stored = 0
            for ds in _datasets(f):
                if ds.dtype.kind == "f":
                    raw += ds.dtype.itemsize * ds.size
                    stored += ds.id.get_storage_size()
            kind = _clean_attr(f.attrs.get("kind", ""))
    except OSError as exc:
        raise _corrupt(path, exc) from exc
    return {"kind": kind, "raw_bytes": int(raw), "stored_bytes": int(stored),
            "file_bytes": os.path.getsize(path), "ratio": raw / stored if stored else math.inf}
