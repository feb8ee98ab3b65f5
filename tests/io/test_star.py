"""RELION STAR particle files: 3.0 and 3.1 layouts, image-name resolution, writers, error cases."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from omlrelion.ctf.optics import Optics
from omlrelion.errors import InputError
from omlrelion.io import star
from omlrelion.io.mrc import ImageStack, write_stack
from omlrelion.io.star import (COLUMN_TYPES, ParticleSet, particle_star_blocks, read_particles,
                               read_star_table, write_particles, write_star)

BOX, APIX = 8, 2.0


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.fixture
def images(tmp_path, rng):
    """Five 8x8 images in tmp_path/stack.mrcs."""
    data = rng.standard_normal((5, BOX, BOX)).astype(np.float32)
    write_stack(tmp_path / "stack.mrcs", data, APIX)
    return data


def loop(name, labels, rows):
    text = [f"data_{name}", "", "loop_"] + [f"_{label} #{i + 1}" for i, label in enumerate(labels)]
    return "\n".join(text + [" ".join(str(v) for v in row) for row in rows]) + "\n\n"


OPTICS_LABELS = ["rlnOpticsGroup", "rlnOpticsGroupName", "rlnVoltage", "rlnSphericalAberration",
                 "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"]
OPTICS_ROWS = [[1, "opticsGroup1", 300, 2.7, 0.1, APIX, BOX, 2], [2, "second", 200, 2.0, 0.07, 2.5, BOX, 2]]
PARTICLE_LABELS = ["rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                   "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnOpticsGroup",
                   "rlnRandomSubset", "rlnMicrographName"]
PARTICLE_ROWS = [
    ["000001@stack.mrcs", 10.5, 20.25, -30.0, 1.0, -2.0, 15000.5, 14800.0, 12.0, 1, 1, "mic1.mrc"],
    ["000003@stack.mrcs", -170.0, 90.0, 45.0, 2.5, 5.0, 20000.0, 19500.0, 100.0, 2, 2, "mic1.mrc"],
    ["5@stack.mrcs", 0.0, 180.0, 179.5, 0.0, 0.0, 12000.0, 12000.0, 0.0, 1, 1, "mic2.mrc"],
]


def star31(folder, optics_rows=OPTICS_ROWS, rows=PARTICLE_ROWS, optics_labels=OPTICS_LABELS,
           labels=PARTICLE_LABELS, name="particles.star"):
    path = Path(folder) / name
    path.write_text("# version 30001\n\n" + loop("optics", optics_labels, optics_rows)
                    + "# version 30001\n\n" + loop("particles", labels, rows))
    return path


LABELS_30 = ["rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY",
             "rlnDefocusU", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
             "rlnDetectorPixelSize", "rlnMagnification", "rlnClassNumber", "rlnParticleFigureOfMerit"]
ROWS_30 = [
    ["1@stack.mrcs", 1.0, 2.0, 3.0, 1.5, -0.5, 10000.0, 300, 2.7, 0.1, 5.0, 25000, 2, 0.5],
    ["2@stack.mrcs", 4.0, 5.0, 6.0, 0.0, 2.0, 11000.0, 200, 2.7, 0.1, 5.0, 25000, 1, 0.25],
    ["4@stack.mrcs", 7.0, 8.0, 9.0, -1.0, 0.0, 12000.0, 300, 2.7, 0.1, 5.0, 25000, 1, 0.75],
]


def star30(folder, labels=LABELS_30, rows=ROWS_30, block="", name="old.star"):
    path = Path(folder) / name
    path.write_text(loop(block, labels, rows))
    return path


def assert_same_particles(a: ParticleSet, b: ParticleSet):
    assert a.optics == b.optics
    for field in ("optics_group", "image_stacks", "image_indices", "eulers_deg", "random_subset",
                  "class_number", "defocus_u", "defocus_v", "defocus_angle_deg", "phase_shift_deg",
                  "ctf_bfactor", "ctf_scale", "fom"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    np.testing.assert_allclose(a.shifts_px, b.shifts_px, rtol=0, atol=1e-12)


# --- reading ------------------------------------------------------------------------------------

def test_read_31(tmp_path, images):
    ps = read_particles(star31(tmp_path), require=("rlnImageName", "rlnAngleRot", "rlnDefocusU"))
    assert ps.n_particles == 3 and ps.star_path == tmp_path / "particles.star"
    assert ps.optics == [Optics(APIX, 300.0, 2.7, 0.1, BOX, False, "opticsGroup1"),
                         Optics(2.5, 200.0, 2.0, 0.07, BOX, False, "second")]
    np.testing.assert_array_equal(ps.optics_group, [0, 1, 0])
    np.testing.assert_array_equal(ps.image_indices, [0, 2, 4])
    assert list(ps.image_stacks) == [str(tmp_path / "stack.mrcs")] * 3
    np.testing.assert_array_equal(ps.eulers_deg, [[10.5, 20.25, -30.0], [-170.0, 90.0, 45.0], [0.0, 180.0, 179.5]])
    np.testing.assert_allclose(ps.shifts_px, [[1.0 / APIX, -2.0 / APIX], [2.5 / 2.5, 5.0 / 2.5], [0, 0]])
    np.testing.assert_array_equal(ps.defocus_u, [15000.5, 20000.0, 12000.0])
    np.testing.assert_array_equal(ps.defocus_v, [14800.0, 19500.0, 12000.0])
    np.testing.assert_array_equal(ps.defocus_angle_deg, [12.0, 100.0, 0.0])
    np.testing.assert_array_equal(ps.random_subset, [1, 2, 1])
    # absent labels take RELION's defaults
    np.testing.assert_array_equal(ps.phase_shift_deg, 0.0)
    np.testing.assert_array_equal(ps.ctf_bfactor, 0.0)
    np.testing.assert_array_equal(ps.ctf_scale, 1.0)
    np.testing.assert_array_equal(ps.class_number, 0)
    np.testing.assert_array_equal(ps.fom, 1.0)
    assert ps.optics_table is not None and list(ps.table.columns) == PARTICLE_LABELS
    assert ps.optics_group.dtype == np.int64 and ps.image_indices.dtype == np.int64
    with ImageStack(ps.image_stacks[1]) as stack:
        np.testing.assert_array_equal(stack.read(ps.image_indices[1:2])[0], images[2])


def test_read_31_defaults_without_ctf_and_pose(tmp_path, images):
    path = star31(tmp_path, labels=["rlnImageName", "rlnOpticsGroup", "rlnDefocusU"],
                  rows=[["1@stack.mrcs", 2, 9000.0], ["2@stack.mrcs", 1, 8000.0]])
    ps = read_particles(path)
    np.testing.assert_array_equal(ps.eulers_deg, 0.0)
    np.testing.assert_array_equal(ps.shifts_px, 0.0)
    np.testing.assert_array_equal(ps.defocus_v, ps.defocus_u)  # DefocusV := DefocusU


def test_read_31_micrograph_pixel_size_box_from_stack_and_premultiplied(tmp_path, images):
    labels = ["rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
              "rlnMicrographPixelSize", "rlnCtfDataAreCtfPremultiplied"]
    path = star31(tmp_path, optics_labels=labels, optics_rows=[[4, 300, 2.7, 0.1, 1.5, 1]],
                  labels=["rlnImageName", "rlnOpticsGroup", "rlnOriginXAngst"], rows=[["2@stack.mrcs", 4, 3.0]])
    ps = read_particles(path)
    assert ps.optics == [Optics(1.5, 300, 2.7, 0.1, BOX, True, "opticsGroup4")]
    np.testing.assert_allclose(ps.shifts_px, [[2.0, 0.0]])


def test_read_31_angpix_argument_is_a_fallback(tmp_path, images):
    labels = ["rlnOpticsGroup", "rlnVoltage", "rlnImageSize"]
    path = star31(tmp_path, optics_labels=labels, optics_rows=[[1, 300, BOX]],
                  labels=["rlnImageName", "rlnOpticsGroup"], rows=[["1@stack.mrcs", 1]])
    assert read_particles(path, angpix=3.0).optics[0].angpix == 3.0
    assert read_particles(star31(tmp_path, name="b.star"), angpix=3.0).optics[0].angpix == APIX


def test_read_30_layout(tmp_path, images):
    ps = read_particles(star30(tmp_path), require=("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    assert ps.optics_table is None
    # pixel size 1e4 * 5 um / 25000 = 2 A; two voltages -> two groups, in order of appearance
    assert ps.optics == [Optics(2.0, 300, 2.7, 0.1, BOX, False, "opticsGroup1"),
                         Optics(2.0, 200, 2.7, 0.1, BOX, False, "opticsGroup2")]
    np.testing.assert_array_equal(ps.optics_group, [0, 1, 0])
    np.testing.assert_array_equal(ps.shifts_px, [[1.5, -0.5], [0.0, 2.0], [-1.0, 0.0]])  # pixels, as written
    np.testing.assert_array_equal(ps.eulers_deg[:, 2], [3.0, 6.0, 9.0])
    np.testing.assert_array_equal(ps.defocus_v, ps.defocus_u)
    np.testing.assert_array_equal(ps.class_number, [2, 1, 1])
    np.testing.assert_array_equal(ps.fom, [0.5, 0.25, 0.75])
    np.testing.assert_array_equal(ps.image_indices, [0, 1, 3])


def test_read_30_pixel_size_sources(tmp_path, images):
    assert read_particles(star30(tmp_path), angpix=1.25).optics[0].angpix == 1.25  # argument overrides
    labels = ["rlnImageName", "rlnImagePixelSize", "rlnImageSize", "rlnOriginX"]
    rows = [["1@stack.mrcs", 1.5, BOX, 2.0], ["2@stack.mrcs", 1.75, BOX, 1.0]]
    ps = read_particles(star30(tmp_path, labels, rows, block="images", name="p.star"))
    assert [o.angpix for o in ps.optics] == [1.5, 1.75] and [o.voltage_kv for o in ps.optics] == [200.0, 200.0]
    np.testing.assert_array_equal(ps.shifts_px[:, 0], [2.0, 1.0])


def test_image_names_relative_to_star_folder(tmp_path, images, monkeypatch):
    sub = tmp_path / "job" / "sub"
    sub.mkdir(parents=True)
    write_stack(sub / "local.mrcs", images, APIX)
    path = star30(tmp_path / "job", LABELS_30[:1] + ["rlnImagePixelSize"], [["0002@sub/local.mrcs", APIX]])
    monkeypatch.chdir(tmp_path)
    ps = read_particles(path)
    assert ps.image_stacks[0] == str(sub / "local.mrcs") and ps.image_indices[0] == 1


def test_image_names_relative_to_cwd(tmp_path, images, monkeypatch):
    (tmp_path / "Refine3D").mkdir()
    path = star30(tmp_path / "Refine3D", ["rlnImageName", "rlnImagePixelSize"], [["3@stack.mrcs", APIX]])
    monkeypatch.chdir(tmp_path)
    ps = read_particles(path)
    assert ps.image_stacks[0] == str(tmp_path / "stack.mrcs") and ps.image_indices[0] == 2
    # the STAR file's folder wins when both hold the stack
    write_stack(tmp_path / "Refine3D" / "stack.mrcs", images[:3], APIX)
    assert read_particles(path).image_stacks[0] == str(tmp_path / "Refine3D" / "stack.mrcs")


def test_absolute_image_names(tmp_path, images, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    path = star30(tmp_path / "elsewhere", ["rlnImageName", "rlnImagePixelSize"],
                  [[f"1@{tmp_path / 'stack.mrcs'}", APIX]])
    assert read_particles(path).image_stacks[0] == str(tmp_path / "stack.mrcs")


def test_simple_block_and_integer_coercion(tmp_path, images):
    path = tmp_path / "one.star"
    path.write_text("data_optics\n\n_rlnOpticsGroup 1\n_rlnImagePixelSize 2.0\n_rlnImageSize 8.0\n\n"
                    + loop("particles", ["rlnImageName", "rlnOpticsGroup", "rlnRandomSubset"],
                           [["1@stack.mrcs", "1.0", "2.0"]]))
    ps = read_particles(path)
    assert ps.optics[0].box_size == BOX and ps.random_subset.tolist() == [2]
    assert ps.table["rlnRandomSubset"].dtype == np.int64


# --- writing ------------------------------------------------------------------------------------

def data_rows(text: str, block: str) -> list[list[str]]:
    """Values of a loop block in a written STAR text, split on whitespace."""
    lines = text.split(f"data_{block}\n", 1)[1].split("data_", 1)[0].splitlines()
    return [line.split() for line in lines if line.strip() and not line.startswith(("_", "loop_", "#"))]


def test_write_particles_round_trip_31(tmp_path, images):
    ps = read_particles(star31(tmp_path))
    out = tmp_path / "out.star"
    write_particles(out, ps)
    back = read_particles(out)
    assert_same_particles(ps, back)
    pd.testing.assert_frame_equal(back.optics_table, ps.optics_table)
    pd.testing.assert_frame_equal(back.table[PARTICLE_LABELS], ps.table, check_exact=False, rtol=1e-14)
    text = out.read_text()
    assert text.count("# version 30001") == 2
    for row in data_rows(text, "optics"):  # integers stay integers for RELION
        assert row[0].isdigit() and row[6].isdigit() and row[7].isdigit()
    column = list(back.table.columns)
    for row in data_rows(text, "particles"):
        assert row[column.index("rlnOpticsGroup")] in ("1", "2")
        assert row[column.index("rlnRandomSubset")] in ("1", "2")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_write_particles_with_new_poses(tmp_path, images, rng):
    ps = read_particles(star31(tmp_path))
    ps.eulers_deg = rng.uniform(-180, 180, (3, 3))
    ps.shifts_px = rng.uniform(-3, 3, (3, 2))
    ps.random_subset = np.array([2, 1, 2])
    ps.ctf_bfactor = np.array([0.0, 10.0, 0.0])
    write_particles(tmp_path / "new.star", ps)
    back = read_particles(tmp_path / "new.star")
    assert_same_particles(ps, back)
    expected = ps.shifts_px * np.array([APIX, 2.5, APIX])[:, None]
    np.testing.assert_allclose(back.table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(), expected)
    assert "rlnCtfScalefactor" not in back.table.columns  # defaults are not written out


def test_write_particles_from_30(tmp_path, images):
    ps = read_particles(star30(tmp_path))
    write_particles(tmp_path / "new.star", ps)
    blocks = starfile.read(tmp_path / "new.star", always_dict=True)
    assert list(blocks) == ["optics", "particles"]
    assert not {"rlnOriginX", "rlnOriginY", "rlnVoltage", "rlnMagnification"} & set(blocks["particles"].columns)
    back = read_particles(tmp_path / "new.star")
    assert back.optics_table is not None
    assert_same_particles(ps, back)


def test_select_and_write_subset(tmp_path, images):
    ps = read_particles(star31(tmp_path))
    half = ps.select(ps.random_subset == 1)
    assert half.n_particles == 2 and len(half.table) == 2
    np.testing.assert_array_equal(half.image_indices, [0, 4])
    picked = ps.select([2, 0])
    np.testing.assert_array_equal(picked.eulers_deg, ps.eulers_deg[[2, 0]])
    assert picked.table["rlnImageName"].tolist() == ["5@stack.mrcs", "000001@stack.mrcs"]
    assert ps.select([]).n_particles == 0
    write_particles(tmp_path / "half.star", half)
    assert_same_particles(half, read_particles(tmp_path / "half.star"))
    for bad in ([3], [-1], np.ones(2, bool), [0.5]):
        with pytest.raises(ValueError):
            ps.select(bad)


def test_particle_star_blocks(tmp_path, images):
    optics = [Optics(APIX, 300, 2.7, 0.1, BOX, True, "sim")]
    columns = {"rlnImageName": [f"{k:06d}@stack.mrcs" for k in (1, 2)], "rlnAngleRot": np.array([1.0, 2.0]),
               "rlnOriginXAngst": np.array([2.0, -4.0]), "rlnDefocusU": np.array([1e4, 2e4]),
               "rlnRandomSubset": np.array([1.0, 2.0])}
    blocks = particle_star_blocks(optics, columns)
    write_star(tmp_path / "sim.star", blocks)
    text = (tmp_path / "sim.star").read_text()
    assert "_rlnImageDimensionality" in text and "_rlnCtfDataAreCtfPremultiplied" in text
    assert data_rows(text, "particles")[1][-1] == "1" and data_rows(text, "particles")[1][-2] == "2"
    ps = read_particles(tmp_path / "sim.star")
    assert ps.optics == optics
    np.testing.assert_array_equal(ps.shifts_px[:, 0], [1.0, -2.0])
    np.testing.assert_array_equal(ps.random_subset, [1, 2])
    with pytest.raises(InputError, match="several optics groups"):
        particle_star_blocks(optics * 2, columns)
    with pytest.raises(InputError, match="differ in length"):
        particle_star_blocks(optics, {"rlnImageName": ["1@a"], "rlnAngleRot": [1.0, 2.0]})
    with pytest.raises(InputError, match="1..1"):
        particle_star_blocks(optics, {"rlnImageName": ["1@a"], "rlnOpticsGroup": [2]})
    with pytest.raises(InputError, match="at least one"):
        particle_star_blocks([], columns)


def test_write_star_round_trip_and_types(tmp_path):
    blocks = {"general": pd.DataFrame({"rlnImageSize": [64.0], "rlnVoltage": [300]}),
              "t": pd.DataFrame({"rlnAngleRot": [0.1 + 0.2, 1e-9], "rlnOpticsGroup": [1.0, 2.0],
                                 "rlnImageName": ["1@a b.mrcs", "2@c.mrcs"]})}
    write_star(tmp_path / "t.star", blocks)
    back = starfile.read(tmp_path / "t.star", always_dict=True)
    assert back["general"]["rlnImageSize"].tolist() == [64] and back["general"]["rlnVoltage"].tolist() == [300.0]
    assert back["t"]["rlnAngleRot"].tolist() == [0.1 + 0.2, 1e-9]  # full precision
    assert back["t"]["rlnOpticsGroup"].dtype == np.int64
    assert back["t"]["rlnImageName"].tolist() == ["1@a b.mrcs", "2@c.mrcs"]


# --- writer errors ------------------------------------------------------------------------------

def test_write_star_errors_leave_nothing(tmp_path, monkeypatch):
    good = {"particles": pd.DataFrame({"rlnAngleRot": [1.0]})}
    with pytest.raises(InputError, match="does not exist") as err:
        write_star(tmp_path / "no" / "x.star", good)
    assert str(tmp_path / "no" / "x.star") in str(err.value)
    for blocks, message in (({"p": pd.DataFrame({"rlnAngleRot": [np.nan]})}, "NaN"),
                            ({"p": pd.DataFrame({"rlnOpticsGroup": [1.5]})}, "non-integer"),
                            ({"p": [1, 2]}, "DataFrame")):
        with pytest.raises(InputError, match=message) as err:
            write_star(tmp_path / "x.star", blocks)
        assert str(tmp_path / "x.star") in str(err.value)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "x.star").write_text("old")

    def failing_replace(src, dst):
        raise OSError(122, "Disk quota exceeded")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(InputError, match="Disk quota") as err:
        write_star(tmp_path / "x.star", good)
    assert str(tmp_path / "x.star") in str(err.value)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["x.star"] and (tmp_path / "x.star").read_text() == "old"


def test_write_star_permission_denied(tmp_path, monkeypatch):
    """What a read-only folder does for a non-root user (root ignores the permission bits)."""
    def denied(name, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(name))

    monkeypatch.setattr(star, "open", denied, raising=False)
    with pytest.raises(InputError, match="Permission denied.*writable") as err:
        write_star(tmp_path / "x.star", {"particles": pd.DataFrame({"rlnAngleRot": [1.0]})})
    assert str(tmp_path / "x.star") in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_write_particles_read_only_folder(tmp_path, read_only_folder, images):
    ps = read_particles(star31(tmp_path))
    with read_only_folder(tmp_path) as folder:
        with pytest.raises(InputError, match="writable") as err:
            write_particles(folder / "out.star", ps)
        assert str(folder / "out.star") in str(err.value)
        assert list(folder.iterdir()) == []


# --- reader errors ------------------------------------------------------------------------------

def replaced(rows, row, column, value, labels=PARTICLE_LABELS):
    rows = [list(r) for r in rows]
    rows[row][labels.index(column)] = value
    return rows


BAD_31 = {
    "missing image label": (dict(labels=PARTICLE_LABELS[1:], rows=[r[1:] for r in PARTICLE_ROWS]),
                            r"missing label\(s\) rlnImageName.*needed: rlnImageName"),
    "malformed name": (dict(rows=replaced(PARTICLE_ROWS, 1, "rlnImageName", "stack.mrcs")),
                       r"row 2: malformed rlnImageName 'stack.mrcs'"),
    "zero index": (dict(rows=replaced(PARTICLE_ROWS, 0, "rlnImageName", "0@stack.mrcs")),
                   "row 1: malformed rlnImageName '0@stack.mrcs'"),
    "empty stack name": (dict(rows=replaced(PARTICLE_ROWS, 2, "rlnImageName", "3@")), "row 3: malformed"),
    "missing stack": (dict(rows=replaced(PARTICLE_ROWS, 2, "rlnImageName", "1@gone.mrcs")),
                      r"row 3: image stack 'gone.mrcs' not found"),
    "unknown optics group": (dict(rows=replaced(PARTICLE_ROWS, 1, "rlnOpticsGroup", 3)),
                             r"row 2 references optics group 3, absent from data_optics \(groups: 1, 2\)"),
    "duplicated group": (dict(optics_rows=[OPTICS_ROWS[0], OPTICS_ROWS[0]]), "optics group 1 is listed twice"),
    "zero pixel size": (dict(optics_rows=[OPTICS_ROWS[0], OPTICS_ROWS[1][:5] + [0.0] + OPTICS_ROWS[1][6:]]),
                        "pixel size must be > 0"),
    "no pixel size": (dict(optics_labels=OPTICS_LABELS[:5] + OPTICS_LABELS[6:],
                           optics_rows=[r[:5] + r[6:] for r in OPTICS_ROWS]), "no pixel size.*--angpix"),
    "NaN angle": (dict(rows=replaced(PARTICLE_ROWS, 2, "rlnAngleTilt", "nan")),
                  "label rlnAngleTilt, row 3: NaN"),
    "text in a number": (dict(rows=replaced(PARTICLE_ROWS, 0, "rlnDefocusU", "abc")),
                         "label rlnDefocusU, row 1: 'abc' is not a finite number"),
    "NaN in optics": (dict(optics_rows=[OPTICS_ROWS[0], OPTICS_ROWS[1][:2] + ["nan"] + OPTICS_ROWS[1][3:]]),
                      "data_optics, label rlnVoltage, row 2: NaN"),
    "negative defocus": (dict(rows=replaced(PARTICLE_ROWS, 1, "rlnDefocusV", -5.0)),
                         "row 2: negative rlnDefocusV"),
    "empty table": (dict(rows=[]), "particle table data_particles is empty"),
    "bad voltage": (dict(optics_rows=[OPTICS_ROWS[0][:2] + [0] + OPTICS_ROWS[0][3:], OPTICS_ROWS[1]]),
                    "optics group 'opticsGroup1': voltage_kv must be > 0"),
    "no group column": (dict(labels=PARTICLE_LABELS[:9] + PARTICLE_LABELS[10:],
                             rows=[r[:9] + r[10:] for r in PARTICLE_ROWS]), "lacks rlnOpticsGroup"),
}


@pytest.mark.parametrize("case", BAD_31)
def test_read_31_errors(tmp_path, images, case):
    kwargs, message = BAD_31[case]
    path = star31(tmp_path, **kwargs)
    with pytest.raises(InputError, match=message) as err:
        read_particles(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_required_labels_are_checked_only_when_asked(tmp_path, images):
    path = star31(tmp_path, labels=["rlnImageName", "rlnOpticsGroup"], rows=[["1@stack.mrcs", 1]])
    assert read_particles(path).n_particles == 1
    with pytest.raises(InputError, match=r"missing label\(s\) rlnAngleRot, rlnAnglePsi in data_particles; "
                                         r"needed: rlnImageName, rlnAngleRot, rlnAnglePsi") as err:
        read_particles(path, require=("rlnAngleRot", "rlnAnglePsi"))
    assert str(path) in str(err.value)
    assert read_particles(path, require=("rlnVoltage",)).n_particles == 1  # found in data_optics


@pytest.mark.parametrize("text, message", [
    ("data_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n1 2.0\n", "no particle table"),
    ("just some text\n", "no particle table"),
    ("", "no particle table"),
    ("data_a\n\nloop_\n_rlnAngleRot #1\n1.0\n\ndata_b\n\nloop_\n_rlnAngleTilt #1\n2.0\n", "no particle table"),
    ("data_\n\nloop_\n_rlnImageName #1\n_rlnAngleRot #2\n1@stack.mrcs 1.0 2.0 3.0\n", "cannot parse"),
    ('data_\n\n_rlnImageName "1@stack.mrcs\n', "cannot parse"),
])
def test_unparsable_or_no_table(tmp_path, images, text, message):
    path = tmp_path / "bad.star"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        read_particles(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_binary_file_is_unparsable(tmp_path, rng):
    path = tmp_path / "bin.star"
    path.write_bytes(b"data_\n\nloop_\n_rlnImageName #1\n" + rng.integers(128, 255, 300).astype(np.uint8).tobytes())
    with pytest.raises(InputError, match="cannot parse") as err:
        read_particles(path)
    assert str(path) in str(err.value)


def test_missing_star_file(tmp_path):
    with pytest.raises(InputError, match="STAR file not found") as err:
        read_particles(tmp_path / "nope.star")
    assert str(tmp_path / "nope.star") in str(err.value)


def test_30_errors(tmp_path, images):
    no_pixel = star30(tmp_path, ["rlnImageName", "rlnVoltage"], [["1@stack.mrcs", 300]], name="a.star")
    with pytest.raises(InputError, match="no pixel size.*pass --angpix") as err:
        read_particles(no_pixel)
    assert str(no_pixel) in str(err.value)
    assert read_particles(no_pixel, angpix=1.0).optics[0].angpix == 1.0
    zero_mag = star30(tmp_path, LABELS_30, replaced(ROWS_30, 0, "rlnMagnification", 0, LABELS_30), name="b.star")
    with pytest.raises(InputError, match="pixel size must be > 0") as err:
        read_particles(zero_mag)
    assert str(zero_mag) in str(err.value)
    for bad in (0.0, -1.0, np.nan, "x"):
        with pytest.raises(InputError, match="--angpix must be"):
            read_particles(no_pixel, angpix=bad)
    out_of_range = star30(tmp_path, ["rlnImageName"], [["6@stack.mrcs"]], name="c.star")
    ps = read_particles(out_of_range, angpix=APIX)
    with ImageStack(ps.image_stacks[0]) as stack, pytest.raises(InputError, match="image 6 .*holds 5"):
        stack.read(ps.image_indices)


# --- generic tables -----------------------------------------------------------------------------

POSTPROCESS = ("data_general\n\n_rlnFinalResolution 7.5\n\n"
               + loop("fsc", ["rlnSpectralIndex", "rlnResolution", "rlnGoldStandardFsc"],
                      [[0, 0.0, 1.0], [1, 0.003, 0.99], [2, 0.006, 0.5]]))


def test_read_star_table(tmp_path):
    path = tmp_path / "postprocess.star"
    path.write_text(POSTPROCESS)
    table = read_star_table(path, required=("rlnSpectralIndex", "rlnGoldStandardFsc"))
    assert table["rlnSpectralIndex"].dtype == np.int64
    np.testing.assert_array_equal(table["rlnGoldStandardFsc"], [1.0, 0.99, 0.5])
    assert read_star_table(path, block="general")["rlnFinalResolution"].tolist() == [7.5]
    pd.testing.assert_frame_equal(read_star_table(path, block="fsc"), table)


@pytest.mark.parametrize("text, kwargs, message", [
    (POSTPROCESS, dict(required=("rlnFscMasked",)), r"no table holds the label\(s\) rlnFscMasked"),
    (POSTPROCESS, dict(block="masked"), "no block data_masked"),
    (POSTPROCESS, dict(block="fsc", required=("rlnFscMasked",)), r"missing label\(s\) rlnFscMasked in data_fsc"),
    (POSTPROCESS.replace("0.99", "nan"), dict(block="fsc"), "label rlnGoldStandardFsc, row 2: NaN"),
    ("data_fsc\n\nloop_\n_rlnSpectralIndex #1\n", dict(block="fsc"), "data_fsc is empty"),
    ("data_fsc\n\nloop_\n_rlnSpectralIndex #1\n1 2\n", dict(block="fsc"), "cannot parse"),
])
def test_read_star_table_errors(tmp_path, text, kwargs, message):
    path = tmp_path / "t.star"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        read_star_table(path, **kwargs)
    assert str(err.value).startswith(str(path))
    with pytest.raises(InputError, match="not found"):
        read_star_table(tmp_path / "none.star", required=("rlnSpectralIndex",))


# --- Optics -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(angpix=0.0), "angpix"), (dict(angpix=-1.0), "angpix"), (dict(voltage_kv=0.0), "voltage_kv"),
    (dict(amp_contrast=1.0), "amp_contrast"), (dict(amp_contrast=-0.1), "amp_contrast"),
    (dict(box_size=1), "box_size must be >= 2"), (dict(box_size=8.5), "integer"),
    (dict(box_size=True), "integer"), (dict(cs_mm=np.inf), "finite"), (dict(angpix="a"), "number"),
])
def test_optics_validation(kwargs, message):
    values = dict(angpix=1.0, voltage_kv=300.0, cs_mm=2.7, amp_contrast=0.1, box_size=64, name="g")
    with pytest.raises(InputError, match=message):
        Optics(**(values | kwargs))


def test_optics_is_frozen_and_normalised():
    optics = Optics(np.float32(1.5), 300, 2.7, 0.1, np.int64(64), 1, "g")
    assert optics == Optics(1.5, 300.0, 2.7, 0.1, 64, True, "g")
    assert type(optics.box_size) is int and type(optics.angpix) is float and optics.ctf_premultiplied is True
    with pytest.raises(AttributeError):
        optics.angpix = 2.0


def test_column_types_cover_the_labels_we_use():
    for label in ("rlnOpticsGroup", "rlnRandomSubset", "rlnImageSize", "rlnClassNumber"):
        assert COLUMN_TYPES[label] is int
    for field, (label, _) in star._FIELD_LABELS.items():
        assert label in COLUMN_TYPES, field


# --- the RELION-simulated reference set, read in place --------------------------------------------

def test_real_relion_particles():
    data = Path(os.environ.get("OMLRELION_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
    path = data / "relion_sim64" / "particles.star"
    if not path.is_file():
        pytest.skip(f"RELION reference data not found at {path} (set OMLRELION_DATA)")
    ps = read_particles(path, require=("rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    header = next(line for line in path.read_text().splitlines() if line.strip().startswith("1 opticsGroup1"))
    assert float(header.split()[5]) == 5.078125
    assert ps.n_particles == 2000 and len(ps.optics) == 1
    assert ps.optics[0].box_size == 64 and ps.optics[0].angpix == 5.078125
    assert set(ps.image_stacks) == {str(path.parent / "particles.mrcs")}
    np.testing.assert_array_equal(ps.image_indices, np.arange(2000))
    np.testing.assert_array_equal(np.unique(ps.random_subset), [1, 2])
    assert np.abs(ps.shifts_px).max() <= 3.0 + 1e-6
    with ImageStack(ps.image_stacks[0]) as stack:
        assert stack.n_images == 2000 and stack.box_size == 64 and stack.angpix == pytest.approx(5.078125)
        first = stack.read(ps.image_indices[:1])
    assert first.shape == (1, 64, 64) and first.dtype == np.float32 and np.isfinite(first).all()
    assert first.std() > 0
