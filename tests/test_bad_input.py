"""Bad input, end to end through the command line: one case per test.

Each case breaks one input (a file, a STAR label, an option, an output path) of an otherwise good
run and calls the CLI in-process. For every case:
  * the exit status is non-zero;
  * stderr is exactly one line, "<prog>: error: <message>", nothing on stdout;
  * the message names the offending file (its path) or option, and says what was expected or what
    to do: messages read "<file or option>: <what is wrong>; <what was expected / the fix>", and
    that last part uses one of FIX_WORDS;
  * nothing new is left anywhere under the test's folder: no output, no temporary file.

The inputs are tiny (box 16, six particles) and built in tmp_path.
"""

from __future__ import annotations

import errno
import re
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from omlrelion.cli.external_reconstruct import run as run_external
from omlrelion.cli.main import run
from omlrelion.io.mrc import write_map, write_stack

BOX, APIX, N = 16, 2.0, 6
# what a message says after naming the file or option: what was expected, or what to do
FIX_WORDS = ("expected", "must", "needed", "needs", "use", "pass", "check", "fix", "create", "convert",
             "remove", "rename", "select", "regenerate")
FIX = re.compile(r"\b(" + "|".join(FIX_WORDS) + r")\b")

OPTICS = {"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
          "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [APIX],
          "rlnImageSize": [BOX], "rlnImageDimensionality": [2]}


def _particles() -> dict[str, list]:
    return {"rlnImageName": [f"{k:06d}@particles.mrcs" for k in range(1, N + 1)],
            "rlnAngleRot": [10.0 * k for k in range(N)], "rlnAngleTilt": [15.0 * k for k in range(N)],
            "rlnAnglePsi": [-20.0 * k for k in range(N)], "rlnOriginXAngst": [0.0] * N,
            "rlnOriginYAngst": [0.0] * N, "rlnDefocusU": [15000.0] * N, "rlnDefocusV": [14500.0] * N,
            "rlnDefocusAngle": [30.0] * N, "rlnOpticsGroup": [1] * N, "rlnRandomSubset": [1, 2] * (N // 2)}


def _loop(name: str, columns: dict[str, list]) -> str:
    labels = list(columns)
    rows = zip(*(columns[label] for label in labels))
    return "\n".join(["# version 30001", "", f"data_{name}", "", "loop_"]
                     + [f"_{label} #{i + 1}" for i, label in enumerate(labels)]
                     + [" ".join(str(v) for v in row) for row in rows]) + "\n\n"


def _new_mrc(path: Path, data: np.ndarray, *, stack: bool = True) -> Path:
    with warnings.catch_warnings():     # mrcfile warns about NaN in the header statistics
        warnings.simplefilter("ignore")
        with mrcfile.new(path, overwrite=True) as m:
            m.set_data(data)
            if stack:
                m.set_image_stack()
            m.voxel_size = APIX
    return path


def _set_mode(path: Path, mode: int) -> None:
    with open(path, "r+b") as f:
        f.seek(12)                      # MODE, the header's fourth int32
        f.write(np.int32(mode).tobytes())


class Inputs:
    """A good run's inputs in tmp_path/in (stack, STAR file, reference map); outputs go to tmp_path/out."""

    def __init__(self, root: Path, monkeypatch, read_only_folder, exit_stack: ExitStack) -> None:
        self.root, self.monkeypatch, self.exit_stack = root, monkeypatch, exit_stack
        self._read_only_folder = read_only_folder
        self.inp, self.out = root / "in", root / "out"
        self.inp.mkdir()
        self.out.mkdir()
        self.star, self.stack, self.ref = self.inp / "particles.star", self.inp / "particles.mrcs", self.inp / "ref.mrc"
        self.images = np.random.default_rng(5).standard_normal((N, BOX, BOX)).astype(np.float32)
        write_stack(self.stack, self.images, APIX)
        self.write_star()
        c = np.arange(BOX) - BOX // 2
        write_map(self.ref, np.exp(-(c[:, None, None] ** 2 + c[:, None] ** 2 + c ** 2) / 10.0), APIX)

    def write_star(self, optics: dict | None = OPTICS, particles: dict | None = None, path: Path | None = None,
                   edit: Callable[[dict, dict], None] | None = None) -> Path:
        optics = {k: list(v) for k, v in optics.items()} if optics is not None else None
        particles = _particles() if particles is None else particles
        if edit is not None:
            edit(optics, particles)
        text = (_loop("optics", optics) if optics is not None else "") + _loop("particles", particles)
        path = path or self.star
        path.write_text(text)
        return path

    def read_only_folder(self) -> Path:
        """A folder this process cannot write to (skips the test when running as root)."""
        return self.exit_stack.enter_context(self._read_only_folder(self.root))

    def reconstruct(self, *extra, star: Path | None = None, out: Path | None = None) -> list[str]:
        return ["reconstruct", "--i", str(star or self.star), "--o", str(out or self.out / "map.mrc"), *extra]

    def refine(self, *extra, star: Path | None = None, ref: Path | None = None, root: Path | None = None) -> list[str]:
        return ["refine", "--i", str(star or self.star), "--ref", str(ref or self.ref),
                "--o", str(root or self.out / "run"), "--iter", "1", "--healpix_order", "0", *extra]

    def simulate(self, *extra, out: Path | None = None) -> list[str]:
        return ["simulate", "--map", "phantom", "--box", str(BOX), "--n", "3", "--o", str(out or self.out / "sim"),
                "--quiet", *extra]


@dataclass(frozen=True)
class Case:
    setup: Callable[[Inputs], list[str]]   # breaks the inputs, returns argv
    names: str                             # the file or option the message must name
    prog: str = ""                         # "omlrelion <command>" from argv[0] unless given


CASES: dict[str, Case] = {}


def case(case_id: str, names: str, prog: str = ""):
    def register(setup):
        CASES[case_id] = Case(setup, names, prog)
        return setup
    return register


# --- image stacks --------------------------------------------------------------------------------

@case("stack-header-truncated", "particles.mrcs")
def _(d: Inputs):
    d.stack.write_bytes(d.stack.read_bytes()[:300])
    return d.reconstruct()


@case("stack-data-truncated", "particles.mrcs")
def _(d: Inputs):
    d.stack.write_bytes(d.stack.read_bytes()[:1024 + BOX * BOX * 4 * 3 + 17])
    return d.reconstruct()


@case("stack-not-an-mrc-file", "particles.mrcs")
def _(d: Inputs):
    d.stack.write_bytes(b"this is not an MRC file\n" * 100)
    return d.reconstruct()


@case("stack-header-garbage-mode-number", "particles.mrcs")
def _(d: Inputs):
    _set_mode(d.stack, 77)
    return d.reconstruct()


@case("stack-complex-mode-4", "particles.mrcs")
def _(d: Inputs):
    _new_mrc(d.stack, d.images.astype(np.complex64))
    return d.reconstruct()


@case("stack-packed-4bit-mode-101", "particles.mrcs")
def _(d: Inputs):
    _set_mode(d.stack, 101)             # RELION's 4-bit counts: not read (policy: modes 0, 1, 2, 6, 12)
    return d.reconstruct()


@case("stack-nan-pixel", "particles.mrcs")
def _(d: Inputs):
    images = d.images.copy()
    images[2, 3, 4] = np.nan
    _new_mrc(d.stack, images)
    return d.reconstruct()


@case("stack-inf-pixel", "particles.mrcs")
def _(d: Inputs):
    images = d.images.copy()
    images[4, 0, 0] = -np.inf
    _new_mrc(d.stack, images)
    return d.reconstruct()


@case("stack-non-square-images", "particles.mrcs")
def _(d: Inputs):
    _new_mrc(d.stack, np.zeros((N, BOX, BOX + 4), np.float32))
    return d.reconstruct()


@case("stack-box-differs-from-star", "particles.mrcs")
def _(d: Inputs):
    write_stack(d.stack, np.zeros((N, BOX + 4, BOX + 4), np.float32), APIX)
    return d.reconstruct()


@case("stack-missing", "gone.mrcs")
def _(d: Inputs):
    def edit(optics, particles):
        particles["rlnImageName"][3] = "000004@gone.mrcs"
    d.write_star(edit=edit)
    return d.reconstruct()


@case("image-index-beyond-stack-end", "particles.mrcs")
def _(d: Inputs):
    def edit(optics, particles):
        particles["rlnImageName"][-1] = f"{N + 1:06d}@particles.mrcs"
    d.write_star(edit=edit)
    return d.reconstruct()


@case("image-index-zero", "particles.star")
def _(d: Inputs):
    def edit(optics, particles):
        particles["rlnImageName"][0] = "000000@particles.mrcs"
    d.write_star(edit=edit)
    return d.reconstruct()


@case("image-index-negative", "particles.star")
def _(d: Inputs):
    def edit(optics, particles):
        particles["rlnImageName"][1] = "-2@particles.mrcs"
    d.write_star(edit=edit)
    return d.reconstruct()


# --- STAR files ----------------------------------------------------------------------------------

@case("star-missing", "nope.star")
def _(d: Inputs):
    return d.reconstruct(star=d.inp / "nope.star")


@case("star-not-a-star-file", "particles.star")
def _(d: Inputs):
    d.star.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return d.reconstruct()


@case("star-missing-label-rlnImageName", "rlnImageName")
def _(d: Inputs):
    d.write_star(edit=lambda optics, particles: particles.pop("rlnImageName"))
    return d.reconstruct()


@case("star-missing-label-rlnAngleRot", "rlnAngleRot")
def _(d: Inputs):
    d.write_star(edit=lambda optics, particles: particles.pop("rlnAngleRot"))
    return d.reconstruct()


@case("star-misspelt-label-rlnDefocusUU-with-ctf", "rename rlnDefocusUU to rlnDefocusU")
def _(d: Inputs):
    d.write_star(edit=lambda optics, particles: particles.update(rlnDefocusUU=particles.pop("rlnDefocusU")))
    return d.reconstruct("--ctf")


@case("star-misspelt-label-rlnAngleTlt", "rename rlnAngleTlt to rlnAngleTilt")
def _(d: Inputs):
    d.write_star(edit=lambda optics, particles: particles.update(rlnAngleTlt=particles.pop("rlnAngleTilt")))
    return d.reconstruct()


@case("star-non-numeric-angle", "rlnAnglePsi")
def _(d: Inputs):
    def edit(optics, particles):
        particles["rlnAnglePsi"][2] = "abc"
    d.write_star(edit=edit)
    return d.reconstruct()


@case("star-duplicated-optics-group", "particles.star")
def _(d: Inputs):
    optics = {k: v * 2 for k, v in OPTICS.items()}
    optics["rlnOpticsGroupName"] = ["a", "b"]
    d.write_star(optics=optics)
    return d.reconstruct()


@case("star-particle-in-absent-optics-group", "particles.star")
def _(d: Inputs):
    def edit(optics, particles):
        particles["rlnOpticsGroup"][4] = 3
    d.write_star(edit=edit)
    return d.reconstruct()


@case("star-no-particle-rows", "particles.star")
def _(d: Inputs):
    d.write_star(particles={label: [] for label in _particles()})
    return d.reconstruct()


@case("star-subset-selects-nothing", "particles.star")
def _(d: Inputs):
    d.write_star(edit=lambda optics, particles: particles.update(rlnRandomSubset=[2] * N))
    return d.reconstruct("--subset", "1")


@case("star-negative-defocus", "rlnDefocusV")
def _(d: Inputs):
    def edit(optics, particles):
        particles["rlnDefocusV"][3] = -1200.0
    d.write_star(edit=edit)
    return d.reconstruct("--ctf")


@case("star-zero-pixel-size", "particles.star")
def _(d: Inputs):
    d.write_star(optics=dict(OPTICS, rlnImagePixelSize=[0.0]))
    return d.reconstruct()


@case("star-pre-3.1-without-pixel-size", "--angpix")
def _(d: Inputs):
    d.write_star(optics=None)           # RELION 3.0 layout: one table, no rlnImagePixelSize
    return d.reconstruct()


@case("star-mixed-box-sizes", "particles.star")
def _(d: Inputs):
    write_stack(d.inp / "big.mrcs", np.zeros((N, BOX + 4, BOX + 4), np.float32), APIX)
    optics = {k: v * 2 for k, v in OPTICS.items()}
    optics.update(rlnOpticsGroup=[1, 2], rlnOpticsGroupName=["a", "b"], rlnImageSize=[BOX, BOX + 4])

    def edit(_, particles):
        particles["rlnImageName"][3:] = [f"{k:06d}@big.mrcs" for k in range(1, N - 2)]
        particles["rlnOpticsGroup"][3:] = [2] * (N - 3)
    d.write_star(optics=optics, edit=edit)
    return d.reconstruct()


@case("refine-mixed-pixel-sizes", "particles.star")
def _(d: Inputs):
    optics = {k: v * 2 for k, v in OPTICS.items()}
    optics.update(rlnOpticsGroup=[1, 2], rlnOpticsGroupName=["a", "b"], rlnImagePixelSize=[APIX, 1.5])

    def edit(_, particles):
        particles["rlnOpticsGroup"][3:] = [2] * (N - 3)
    d.write_star(optics=optics, edit=edit)
    return d.refine()


@case("fsc-star-missing", "fsc.star")
def _(d: Inputs):
    return d.reconstruct("--fsc", str(d.inp / "fsc.star"))


# --- reconstruct options -------------------------------------------------------------------------

@case("option-angpix-zero", "--angpix")
def _(d: Inputs):
    return d.reconstruct("--angpix", "0")


@case("option-angpix-negative", "--angpix")
def _(d: Inputs):
    return d.reconstruct("--angpix", "-2.5")


@case("option-angpix-not-a-number", "--angpix")
def _(d: Inputs):
    return d.reconstruct("--angpix", "abc")


@case("option-angpix-nan", "--angpix")
def _(d: Inputs):
    return d.reconstruct("--angpix", "nan")


@case("option-iter-negative", "--iter")
def _(d: Inputs):
    return d.reconstruct("--iter", "-1")


@case("option-iter-not-an-integer", "--iter")
def _(d: Inputs):
    return d.reconstruct("--iter", "2.5")


@case("option-pad-below-one", "--pad")
def _(d: Inputs):
    return d.reconstruct("--pad", "0.5")


@case("option-pad-nan", "--pad")
def _(d: Inputs):
    return d.reconstruct("--pad", "nan")


@case("option-maxres-infinite", "--maxres")
def _(d: Inputs):
    return d.reconstruct("--maxres", "inf")


@case("option-batch-zero", "--batch")
def _(d: Inputs):
    return d.reconstruct("--batch", "0")


@case("option-required-i-missing", "--i")
def _(d: Inputs):
    return ["reconstruct", "--o", str(d.out / "map.mrc")]


@case("device-gpu-7", "--device")
def _(d: Inputs):
    d.star.unlink()         # decided before the particles are read
    return d.reconstruct("--device", "gpu:7")


@case("device-gpu-abc", "--device")
def _(d: Inputs):
    d.star.unlink()
    return d.reconstruct("--device", "gpu:abc")


@case("device-cpu-0", "--device")
def _(d: Inputs):
    d.star.unlink()
    return d.reconstruct("--device", "cpu:0")


@case("device-cpu-abc", "--device")
def _(d: Inputs):
    d.star.unlink()
    return d.reconstruct("--device", "cpu:abc")


# --- output paths --------------------------------------------------------------------------------

@case("output-is-a-directory", "map.mrc")
def _(d: Inputs):
    (d.out / "map.mrc").mkdir()
    return d.reconstruct()


@case("output-folder-missing", "map.mrc")
def _(d: Inputs):
    return d.reconstruct(out=d.out / "no" / "such" / "map.mrc")


@case("output-folder-read-only", "map.mrc")
def _(d: Inputs):
    return d.reconstruct(out=d.read_only_folder() / "map.mrc")


@case("output-write-fails-disk-full", "map.mrc")
def _(d: Inputs):
    def full(path, *args, **kwargs):       # what a full disk does half-way through the map
        Path(path).write_bytes(b"\0" * 1024)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    d.monkeypatch.setattr(mrcfile, "new", full)
    return d.reconstruct()


@case("json-folder-missing", "summary.json")
def _(d: Inputs):
    return d.reconstruct("--json", str(d.out / "no" / "summary.json"))


@case("json-is-a-directory", "summary.json")
def _(d: Inputs):
    (d.out / "summary.json").mkdir()
    return d.reconstruct("--json", str(d.out / "summary.json"))


@case("json-folder-read-only", "summary.json")
def _(d: Inputs):
    return d.reconstruct("--json", str(d.read_only_folder() / "summary.json"))


@case("half-map-missing", "half2.mrc")
def _(d: Inputs):
    write_map(d.inp / "half1.mrc", np.zeros((BOX,) * 3, np.float32), APIX)
    return d.reconstruct("--half_maps", str(d.inp / "half1.mrc"), str(d.inp / "half2.mrc"))


# --- refine --------------------------------------------------------------------------------------

@case("refine-ref-of-another-box", "ref.mrc")
def _(d: Inputs):
    write_map(d.ref, np.zeros((BOX + 4,) * 3, np.float32), APIX)
    return d.refine()


@case("refine-ref-with-nan", "ref.mrc")
def _(d: Inputs):
    volume = np.zeros((BOX,) * 3, np.float32)
    volume[1, 2, 3] = np.nan
    _new_mrc(d.ref, volume, stack=False)
    return d.refine()


@case("refine-ref-missing", "nope.mrc")
def _(d: Inputs):
    return d.refine(ref=d.inp / "nope.mrc")


@case("refine-misspelt-rlnDefocusUU", "rename rlnDefocusUU to rlnDefocusU")
def _(d: Inputs):
    d.write_star(edit=lambda optics, particles: particles.update(rlnDefocusUU=particles.pop("rlnDefocusU")))
    return d.refine()


@case("refine-device-gpu-7", "--device")
def _(d: Inputs):
    d.star.unlink()         # decided before the particles are read
    return d.refine("--device", "gpu:7")


@case("refine-output-folder-missing", "no/run")
def _(d: Inputs):
    return d.refine(root=d.out / "no" / "run")


@case("refine-output-folder-read-only", "ro/run")
def _(d: Inputs):
    return d.refine(root=d.read_only_folder() / "run")


@case("refine-iter-negative", "--iter")
def _(d: Inputs):
    return d.refine("--iter", "-1")


@case("refine-stack-nan-pixel", "particles.mrcs")
def _(d: Inputs):
    images = d.images.copy()
    images[0, 5, 5] = np.nan
    _new_mrc(d.stack, images)
    return d.refine()


# --- simulate, autotune, external reconstruction ---------------------------------------------------

@case("simulate-n-zero", "--n")
def _(d: Inputs):
    return d.simulate("--n", "0")


@case("simulate-n-not-a-number", "--n")
def _(d: Inputs):
    return d.simulate("--n", "many")


@case("simulate-output-folder-missing", "--o")
def _(d: Inputs):
    return d.simulate(out=d.out / "no" / "sim")


@case("simulate-output-folder-read-only", "--o")
def _(d: Inputs):
    return d.simulate(out=d.read_only_folder() / "sim")


@case("simulate-star-output-is-a-directory", "sim.star")
def _(d: Inputs):
    (d.out / "sim.star").mkdir()
    return d.simulate()


@case("simulate-map-wrong-mode", "ref.mrc")
def _(d: Inputs):
    _set_mode(d.ref, 4)
    return ["simulate", "--map", str(d.ref), "--n", "3", "--o", str(d.out / "sim"), "--quiet"]


@case("autotune-odd-box", "--box")
def _(d: Inputs):
    return ["autotune", "--box", "15", "--json", str(d.out / "plan.json")]


@case("autotune-json-folder-missing", "plan.json")
def _(d: Inputs):
    return ["autotune", "--box", "16", "--json", str(d.out / "no" / "plan.json")]


@case("external-reconstruct-star-missing", "request.star", prog="omlrelion_external_reconstruct")
def _(d: Inputs):
    return ["external_reconstruct", str(d.inp / "request.star")]


@case("external-reconstruct-device-gpu-7", "--device", prog="omlrelion_external_reconstruct")
def _(d: Inputs):
    return ["external_reconstruct", "--device", "gpu:7", str(d.inp / "request.star")]


# --------------------------------------------------------------------------------------------------

def _call(argv: list[str]) -> int:
    try:
        if argv[0] == "external_reconstruct":
            return run_external(argv[1:])
        return run(argv)
    except SystemExit as exc:       # argparse's errors
        return exc.code


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def inputs(tmp_path, monkeypatch, read_only_folder):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMLRELION_AUTOTUNE_CACHE", str(tmp_path / "in" / "cache"))
    with ExitStack() as stack:
        yield Inputs(tmp_path, monkeypatch, read_only_folder, stack)


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input(case_id, inputs, capsys):
    case = CASES[case_id]
    argv = case.setup(inputs)
    before = _tree(inputs.root)
    capsys.readouterr()
    status = _call(argv)
    captured = capsys.readouterr()
    assert status not in (0, None), captured
    lines = captured.err.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].strip(), captured.err
    prog = case.prog or f"omlrelion {argv[0]}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    message = lines[0][len(f"{prog}: error: "):]
    assert case.names in message, message
    assert FIX.search(message), f"says neither what was expected nor what to do: {message}"
    assert captured.out == ""
    assert _tree(inputs.root) == before          # no output, no temporary file


def test_at_least_30_cases():
    assert len(CASES) >= 30


def _header_angpix_differs(d: Inputs) -> None:
    write_stack(d.stack, d.images, 3.7)


def _two_pixel_sizes(d: Inputs) -> None:
    optics = {k: v * 2 for k, v in OPTICS.items()}
    optics.update(rlnOpticsGroup=[1, 2], rlnOpticsGroupName=["a", "b"], rlnImagePixelSize=[APIX, 1.1 * APIX])

    def edit(_, particles):
        particles["rlnOpticsGroup"][3:] = [2] * (N - 3)
    d.write_star(optics=optics, edit=edit)


@pytest.mark.parametrize("change", [_header_angpix_differs, _two_pixel_sizes],
                         ids=["stack-header-pixel-size-differs-from-star", "optics-groups-of-two-pixel-sizes"])
def test_what_relion_accepts_is_no_error(change, tmp_path, monkeypatch, read_only_folder):
    """RELION trusts the STAR file's pixel size, not the stack header's, and relion_reconstruct rescales
    optics groups of other pixel sizes to the first group's: neither is an error."""
    with ExitStack() as stack:
        d = Inputs(tmp_path, monkeypatch, read_only_folder, stack)
        change(d)
        assert run(d.reconstruct("--ctf", "--quiet")) == 0
        with mrcfile.open(d.out / "map.mrc") as m:
            assert m.data.shape == (BOX,) * 3 and np.isfinite(m.data).all()
            assert float(m.voxel_size.x) == pytest.approx(APIX)
