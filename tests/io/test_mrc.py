"""MRC maps and MRCS stacks: round trips, modes, header fields, atomic writes, every error case."""

import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from omlrelion import __version__
from omlrelion.errors import InputError
from omlrelion.io import mrc
from omlrelion.io.mrc import ImageStack, read_map, write_map, write_stack


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


def leftovers(folder: Path) -> list[str]:
    """Temporary files a writer might have left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def new_mrc(path, data, voxel_size=None, stack=False):
    with warnings.catch_warnings():  # mrcfile warns when the data hold NaN: intended here
        warnings.simplefilter("ignore", RuntimeWarning)
        _new_mrc(path, data, voxel_size, stack)
    return path


def _new_mrc(path, data, voxel_size, stack):
    with mrcfile.new(path, overwrite=True) as f:
        f.set_data(data)
        if stack:
            f.set_image_stack()
        if voxel_size is not None:
            f.voxel_size = voxel_size


# --- maps -------------------------------------------------------------------------------------

def test_map_round_trip_and_header(tmp_path, rng):
    volume = rng.standard_normal((12, 10, 8)).astype(np.float32)
    path = tmp_path / "map.mrc"
    write_map(path, volume, 1.37)
    back, angpix = read_map(path)
    assert back.dtype == np.float32 and back.shape == (12, 10, 8)
    np.testing.assert_array_equal(back, volume)
    assert angpix == pytest.approx(1.37, rel=1e-6)
    with mrcfile.open(path) as f:
        h = f.header
        assert int(h.mode) == 2
        assert (float(h.cella.x), float(h.cella.y), float(h.cella.z)) == pytest.approx((8 * 1.37, 10 * 1.37, 12 * 1.37))
        assert (int(h.mx), int(h.my), int(h.mz)) == (8, 10, 12)
        assert (float(h.origin.x), float(h.origin.y), float(h.origin.z)) == (0.0, 0.0, 0.0)
        assert int(h.nlabl) == 1 and h.label[0].decode().startswith(f"omlrelion {__version__}")
        assert float(h.dmin) == pytest.approx(volume.min()) and float(h.dmax) == pytest.approx(volume.max())
        assert float(h.dmean) == pytest.approx(volume.mean(), abs=1e-5)
        assert float(h.rms) == pytest.approx(volume.std(), rel=1e-4)
    assert leftovers(tmp_path) == []


def test_write_map_casts_float64_and_overwrites(tmp_path, rng):
    path = tmp_path / "map.mrc"
    write_map(path, np.zeros((4, 4, 4)), 2.0)
    volume = rng.standard_normal((4, 4, 4))
    write_map(path, volume, 3.0)
    back, angpix = read_map(path)
    np.testing.assert_array_equal(back, volume.astype(np.float32))
    assert angpix == 3.0


@pytest.mark.parametrize("mode, dtype", [(0, np.int8), (1, np.int16), (2, np.float32), (6, np.uint16),
                                         (12, np.float16)])
def test_read_modes(tmp_path, rng, mode, dtype):
    data = rng.integers(-100 if np.dtype(dtype).kind != "u" else 0, 100, size=(3, 6, 6)).astype(dtype)
    path = new_mrc(tmp_path / f"m{mode}.mrc", data, voxel_size=2.5)
    with mrcfile.open(path) as f:
        assert int(f.header.mode) == mode
    volume, angpix = read_map(path)
    assert volume.dtype == np.float32 and angpix == 2.5
    np.testing.assert_array_equal(volume, data.astype(np.float32))
    stack = new_mrc(tmp_path / f"s{mode}.mrcs", data, voxel_size=2.5, stack=True)
    with ImageStack(stack) as images:
        np.testing.assert_array_equal(images.read([2, 0]), data[[2, 0]].astype(np.float32))


def test_unknown_pixel_size_is_zero_and_2d_image(tmp_path, rng):
    data = rng.standard_normal((5, 7)).astype(np.float32)
    volume, angpix = read_map(new_mrc(tmp_path / "img.mrc", data))
    assert angpix == 0.0 and volume.shape == (1, 5, 7)
    np.testing.assert_array_equal(volume[0], data)


def test_extra_trailing_bytes_are_tolerated(tmp_path, rng):
    volume = rng.standard_normal((4, 4, 4)).astype(np.float32)
    path = tmp_path / "big.mrc"
    write_map(path, volume, 1.0)
    with open(path, "ab") as f:
        f.write(b"\0" * 16)
    np.testing.assert_array_equal(read_map(path)[0], volume)
    with ImageStack(path) as images:
        assert images.n_images == 4


# --- stacks -----------------------------------------------------------------------------------

def test_stack_round_trip(tmp_path, rng):
    images = rng.standard_normal((7, 16, 16)).astype(np.float32)
    path = tmp_path / "p.mrcs"
    write_stack(path, images, 4.2)
    with mrcfile.open(path) as f:
        assert int(f.header.ispg) == 0 and f.is_image_stack() and int(f.header.mode) == 2
        assert float(f.header.cella.x) == pytest.approx(16 * 4.2)
    with ImageStack(path) as stack:
        assert (stack.n_images, stack.box_size, stack.path) == (7, 16, path)
        assert stack.angpix == pytest.approx(4.2, rel=1e-6)
        np.testing.assert_array_equal(stack.read(np.arange(7)), images)
        np.testing.assert_array_equal(stack.read([6, 1, 1]), images[[6, 1, 1]])
        np.testing.assert_array_equal(stack.read(3), images[3:4])
        assert stack.read([]).shape == (0, 16, 16)
    assert leftovers(tmp_path) == []


def test_stack_is_memory_mapped_and_closes(tmp_path, rng):
    path = tmp_path / "p.mrcs"
    write_stack(path, rng.standard_normal((3, 8, 8)), 1.0)
    stack = ImageStack(path)
    assert isinstance(stack._mrc, mrcfile.mrcmemmap.MrcMemmap)
    stack.close()
    stack.close()
    with pytest.raises(ValueError, match="closed"):
        stack.read([0])


def test_stack_single_image(tmp_path, rng):
    image = rng.standard_normal((1, 6, 6)).astype(np.float32)
    path = tmp_path / "one.mrcs"
    write_stack(path, image, 1.0)
    with ImageStack(path) as stack:
        assert stack.n_images == 1
        np.testing.assert_array_equal(stack.read([0]), image)


# --- read errors ------------------------------------------------------------------------------

def truncated(tmp_path, rng, name):
    path = tmp_path / name
    write_stack(path, rng.standard_normal((4, 8, 8)), 1.0)
    os.truncate(path, path.stat().st_size - 100)
    return path


def not_mrc(tmp_path, rng, name):
    path = tmp_path / name
    path.write_bytes(rng.integers(0, 255, size=4096).astype(np.uint8).tobytes())
    return path


def complex_mode(tmp_path, rng, name):
    return new_mrc(tmp_path / name, (rng.standard_normal((2, 4, 4)) + 1j).astype(np.complex64))


def unknown_mode(tmp_path, rng, name):
    path = new_mrc(tmp_path / name, np.zeros((2, 4, 4), np.float32))
    with open(path, "r+b") as f:  # header word 4 (bytes 12..15) is the mode
        f.seek(12)
        f.write(np.int32(3).tobytes())
    return path


def short_header(tmp_path, rng, name):
    path = tmp_path / name
    path.write_bytes(b"MAP " * 10)
    return path


BAD_FILES = {"truncated": (truncated, "truncated"), "not an MRC": (not_mrc, "not a readable MRC"),
             "complex": (complex_mode, "mode 4"), "mode 3": (unknown_mode, "mode 3"),
             "short header": (short_header, "not a readable MRC")}


@pytest.mark.parametrize("case", BAD_FILES)
def test_read_map_bad_files(tmp_path, rng, case):
    make, message = BAD_FILES[case]
    path = make(tmp_path, rng, "bad.mrc")
    with pytest.raises(InputError, match=message) as err:
        read_map(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("case", BAD_FILES)
def test_image_stack_bad_files(tmp_path, rng, case):
    make, message = BAD_FILES[case]
    path = make(tmp_path, rng, "bad.mrcs")
    with pytest.raises(InputError, match=message) as err:
        ImageStack(path)
    assert str(path) in str(err.value)


def test_missing_files(tmp_path):
    for call in (read_map, ImageStack):
        with pytest.raises(InputError, match="not found") as err:
            call(tmp_path / "nope.mrc")
        assert str(tmp_path / "nope.mrc") in str(err.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_read_map_non_finite(tmp_path, rng, bad):
    volume = rng.standard_normal((4, 4, 4)).astype(np.float32)
    volume[1, 2, 3] = bad
    path = new_mrc(tmp_path / "nan.mrc", volume)
    with pytest.raises(InputError, match=r"NaN or Inf.*\(1, 2, 3\)") as err:
        read_map(path)
    assert str(path) in str(err.value)


def test_read_map_refuses_volume_stack(tmp_path):
    path = tmp_path / "vstack.mrc"
    with mrcfile.new(path) as f:
        f.set_data(np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(InputError, match="stack of volumes"):
        read_map(path)


def test_image_stack_non_square(tmp_path, rng):
    path = new_mrc(tmp_path / "rect.mrcs", rng.standard_normal((3, 8, 6)).astype(np.float32), stack=True)
    with pytest.raises(InputError, match="square.*nx=6, ny=8") as err:
        ImageStack(path)
    assert str(path) in str(err.value)


def test_image_stack_index_out_of_range(tmp_path, rng):
    path = tmp_path / "p.mrcs"
    write_stack(path, rng.standard_normal((5, 8, 8)), 1.0)
    with ImageStack(path) as stack:
        with pytest.raises(InputError, match=r"image 6 \(1-based.*holds 5 images") as err:
            stack.read([0, 5])
        assert str(path) in str(err.value)
        with pytest.raises(InputError, match="image 0 "):
            stack.read([-1])
        with pytest.raises(InputError, match="integers"):
            stack.read([0.5])


def test_image_stack_nan_in_read_images(tmp_path, rng):
    images = rng.standard_normal((4, 8, 8)).astype(np.float32)
    images[2, 3, 3] = np.nan
    path = new_mrc(tmp_path / "nan.mrcs", images, stack=True)
    with ImageStack(path) as stack:
        np.testing.assert_array_equal(stack.read([0, 1, 3]), images[[0, 1, 3]])
        with pytest.raises(InputError, match=r"image 3 \(1-based\) contains NaN") as err:
            stack.read([1, 2])
        assert str(path) in str(err.value)


# --- write errors and atomicity ---------------------------------------------------------------

@pytest.mark.parametrize("writer", [write_map, write_stack])
def test_write_into_missing_folder(tmp_path, rng, writer):
    path = tmp_path / "missing" / "out.mrc"
    with pytest.raises(InputError, match="does not exist") as err:
        writer(path, rng.standard_normal((2, 4, 4)), 1.0)
    assert str(path) in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", [write_map, write_stack])
def test_write_into_read_only_folder(tmp_path, read_only_folder, rng, writer):
    with read_only_folder(tmp_path) as folder:
        with pytest.raises(InputError, match="writable") as err:
            writer(folder / "out.mrc", rng.standard_normal((2, 4, 4)), 1.0)
        assert str(folder / "out.mrc") in str(err.value)
        assert list(folder.iterdir()) == []


@pytest.mark.parametrize("writer", [write_map, write_stack])
def test_permission_denied_is_reported(tmp_path, rng, writer, monkeypatch):
    """What a read-only folder does for a non-root user (root ignores the permission bits)."""
    def denied(name, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(name))

    monkeypatch.setattr(mrc.mrcfile, "new", denied)
    with pytest.raises(InputError, match="Permission denied.*writable") as err:
        writer(tmp_path / "out.mrc", rng.standard_normal((2, 4, 4)), 1.0)
    assert str(tmp_path / "out.mrc") in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", [write_map, write_stack])
def test_failed_rename_leaves_old_output_and_no_temp(tmp_path, rng, writer, monkeypatch):
    path = tmp_path / "out.mrc"
    old = rng.standard_normal((2, 4, 4)).astype(np.float32)
    writer(path, old, 1.0)

    def failing_replace(src, dst):
        assert Path(src).name.startswith(".out.mrc.") and Path(src).exists()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mrc.os, "replace", failing_replace)
    with pytest.raises(InputError, match="No space left") as err:
        writer(path, rng.standard_normal((2, 4, 4)), 1.0)
    assert str(path) in str(err.value)
    monkeypatch.undo()
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out.mrc"]
    np.testing.assert_array_equal(read_map(path)[0], old)


def test_failure_while_writing_removes_temp(tmp_path, rng, monkeypatch):
    def failing_stats(self):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(mrcfile.mrcobject.MrcObject, "update_header_stats", failing_stats)
    with pytest.raises(InputError, match="Input/output error"):
        write_map(tmp_path / "out.mrc", rng.standard_normal((2, 4, 4)), 1.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("volume, angpix, message", [
    (np.zeros((4, 4)), 1.0, "3D array"),
    (np.zeros((0, 4, 4)), 1.0, "non-empty"),
    (np.full((2, 2, 2), np.nan), 1.0, "NaN or Inf"),
    (np.zeros((2, 2, 2)), 0.0, "pixel size must be > 0"),
    (np.zeros((2, 2, 2)), -1.0, "pixel size must be > 0"),
    (np.zeros((2, 2, 2)), "abc", "must be a number"),
])
@pytest.mark.parametrize("writer", [write_map, write_stack])
def test_write_bad_input(tmp_path, writer, volume, angpix, message):
    path = tmp_path / "out.mrc"
    with pytest.raises(InputError, match=message) as err:
        writer(path, volume, angpix)
    assert str(path) in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_write_onto_a_folder(tmp_path):
    (tmp_path / "out.mrc").mkdir()
    with pytest.raises(InputError, match="folder of that name"):
        write_map(tmp_path / "out.mrc", np.zeros((2, 2, 2)), 1.0)
    assert leftovers(tmp_path) == []
