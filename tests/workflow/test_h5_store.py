"""HDF5 stores: bit-exact round trips, checksums, attribute checks, atomic writes, compression."""

from __future__ import annotations

import numpy as np
import pytest

from omlrelion.ctf.optics import Optics
from omlrelion.errors import InputError
from omlrelion.io import h5

from .conftest import flip_byte_in_chunk

CODECS = [h5.Compression("zstd", 5, "byte"), h5.Compression("zstd", 3, "bit"),
          h5.Compression("blosc2", 5, "byte"), h5.Compression("blosc2", 5, "bit"), h5.Compression("none", 1, "byte")]
OPTICS = [Optics(angpix=1.5, voltage_kv=300, cs_mm=2.7, amp_contrast=0.1, box_size=16, name="g1"),
          Optics(angpix=1.5, voltage_kv=200, cs_mm=0.01, amp_contrast=0.07, box_size=16, name="g2")]


def sums_like(rng, size=21, dtype=np.float32):
    """Fourier-sum-like arrays: noise inside a sphere, zeros outside (as the back-projector leaves them)."""
    c = size // 2
    k = np.arange(size) - c
    inside = (k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(c + 1)[None, None, :] ** 2) <= (c - 1) ** 2
    complex_ = np.result_type(dtype, np.complex64)
    data = ((rng.standard_normal(inside.shape) + 1j * rng.standard_normal(inside.shape)) * inside).astype(complex_)
    weight = (rng.random(inside.shape) * inside).astype(dtype)
    return data, weight


ATTRS = {"box_size": 10, "pad": 2.0, "r_max": 5, "angpix": 1.5, "iteration": 3, "half": 1, "config_hash": "abc"}


@pytest.mark.parametrize("compression", CODECS, ids=lambda c: f"{c.codec}-{c.shuffle}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sums_round_trip_is_bit_exact(tmp_path, rng, compression, dtype):
    data, weight = sums_like(rng, dtype=dtype)
    path = tmp_path / "sums.h5"
    h5.write_sums(path, data, weight, attrs=ATTRS, compression=compression)
    d, w, attrs = h5.read_sums(path, expect={"iteration": 3, "pad": 2.0, "angpix": 1.5})
    assert d.dtype == data.dtype and w.dtype == weight.dtype
    assert d.tobytes() == data.tobytes() and w.tobytes() == weight.tobytes()
    assert attrs["kind"] == "sums" and attrs["r_max"] == 5 and attrs["omlrelion_version"]


@pytest.mark.parametrize("compression", CODECS, ids=lambda c: f"{c.codec}-{c.shuffle}")
def test_particle_store_round_trip(tmp_path, rng, compression):
    images = rng.standard_normal((37, 16, 16)).astype(np.float32)
    columns = {"eulers_deg": rng.uniform(-180, 180, (37, 3)), "half": rng.integers(1, 3, 37).astype(np.int8),
               "optics_group": rng.integers(0, 2, 37)}
    path = tmp_path / "particles.h5"
    with h5.ParticleStoreWriter(path, n_particles=37, box_size=16, angpix=1.5, optics=OPTICS,
                                attrs={"config_hash": "x"}, compression=compression) as w:
        w.write_images(0, images[:20])
        w.write_images(20, images[20:])
        w.write_columns(columns)
    with h5.ParticleStore(path, expect={"box_size": 16}) as store:
        assert store.optics == OPTICS
        assert store.read_images(np.arange(37)).tobytes() == images.tobytes()
        pick = np.array([30, 2, 2, 11])
        assert store.read_images(pick).tobytes() == images[pick].tobytes()
        for name, values in columns.items():
            got = store.column(name)
            assert got.dtype == values.dtype and got.tobytes() == values.tobytes()


def test_volume_and_table_round_trip(tmp_path, rng):
    volume = rng.standard_normal((12, 12, 12)).astype(np.float32)
    h5.write_volume(tmp_path / "v.h5", volume, attrs={"box_size": 12, "angpix": 2.0}, compression=h5.Compression())
    back, attrs = h5.read_volume(tmp_path / "v.h5", expect={"box_size": 12})
    assert back.tobytes() == volume.tobytes() and attrs["angpix"] == 2.0
    table = {"index": np.arange(5), "eulers_deg": rng.random((5, 3)), "score": np.full(5, np.nan)}
    h5.write_table(tmp_path / "p.h5", table, attrs={"iteration": 1}, compression=h5.Compression())
    cols, _ = h5.read_table(tmp_path / "p.h5", expect={"iteration": 1})
    assert set(cols) == set(table)
    assert all(cols[k].tobytes() == table[k].tobytes() for k in table)


@pytest.mark.parametrize("compression", CODECS, ids=lambda c: f"{c.codec}-{c.shuffle}")
def test_corrupted_chunk_is_detected(tmp_path, rng, compression):
    data, weight = sums_like(rng)
    path = tmp_path / "sums.h5"
    h5.write_sums(path, data, weight, attrs=ATTRS, compression=compression)
    flip_byte_in_chunk(path, "weight")
    with pytest.raises(InputError, match=r"sums\.h5.*(checksum|corrupt|cannot read)"):
        h5.read_sums(path)


def test_truncated_file_and_wrong_kind(tmp_path, rng):
    data, weight = sums_like(rng)
    path = tmp_path / "sums.h5"
    h5.write_sums(path, data, weight, attrs=ATTRS, compression=h5.Compression())
    with pytest.raises(InputError, match="volume store was expected"):
        h5.read_volume(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match="sums.h5"):
        h5.read_sums(path)


def test_attribute_mismatch_names_the_attribute(tmp_path, rng):
    data, weight = sums_like(rng)
    path = tmp_path / "sums.h5"
    h5.write_sums(path, data, weight, attrs=ATTRS, compression=h5.Compression())
    with pytest.raises(InputError, match="attribute pad is 2.0, expected 1.0"):
        h5.read_sums(path, expect={"pad": 1.0})
    with pytest.raises(InputError, match="attribute iteration is 3, expected 4"):
        h5.read_sums(path, expect={"iteration": 4})
    with pytest.raises(InputError, match="'shard' missing"):
        h5.read_sums(path, expect={"shard": 1})


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "particles.h5"
    with pytest.raises(RuntimeError):
        with h5.ParticleStoreWriter(path, n_particles=4, box_size=16, angpix=1.0, optics=OPTICS[:1], attrs={},
                                    compression=h5.Compression()) as w:
            w.write_images(0, np.zeros((2, 16, 16)))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_bad_compression_settings_name_the_key():
    with pytest.raises(InputError, match="codec 'lz77'"):
        h5.Compression("lz77")
    with pytest.raises(InputError, match="level 12"):
        h5.Compression("zstd", 12)


def test_compression_report(tmp_path, rng):
    """Sphere-shaped sums compress by more than the empty corners alone; a zero map far more."""
    data, weight = sums_like(rng, size=41)
    h5.write_sums(tmp_path / "s.h5", data, weight, attrs=ATTRS, compression=h5.Compression())
    report = h5.compression_report(tmp_path / "s.h5")
    assert report["kind"] == "sums"
    assert report["raw_bytes"] == data.size * 8 + weight.size * 4
    assert report["ratio"] > 1.5
    h5.write_volume(tmp_path / "z.h5", np.zeros((32, 32, 32), np.float32), attrs={"box_size": 32, "angpix": 1.0},
                    compression=h5.Compression())
    assert h5.compression_report(tmp_path / "z.h5")["ratio"] > 50
