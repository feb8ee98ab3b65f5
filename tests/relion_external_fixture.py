"""Run a tiny real ``relion_refine --external_reconstruct`` on the shared test set.

Test utility for the external-reconstruction interface (see
docs/relion-external-reconstruct.md): RELION does the E-step, writes its
Fourier-space sums and a STAR file, and calls the program named in
``RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE`` for every M-step reconstruction.

Usage in a test::

    from relion_external_fixture import run_relion_refine_external

    out = run_relion_refine_external(tmp_path, Path(".../omlrelion_external_reconstruct"))
    stars = sorted(out.glob("*_external_reconstruct.star"))   # one per call

Default run (about 5 s on 2 cores): MPI auto-refine (3 ranks), ``--auto_iter_max 1``,
healpix order 1, i.e. one iteration and two external calls, one per half set
(``run_it001_half1_class001_external_reconstruct.star`` and ``..._half2_...``), run
concurrently by MPI ranks 1 and 2. Without ``mpirun``/``relion_refine_mpi`` (or with
``auto_refine=False``) it runs the serial ``relion_refine --iter 2`` instead: two
sequential calls (``run_it001_class001_...``, ``run_it002_class001_...``).

RELION programs are taken from ``OMLRELION_RELION_BIN`` (a folder) if set, else from
the PATH, else from the relocatable bundle under ``<repo>/.relion/``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
OUTPUT_DIR = "refine"          # relative to workdir: RELION runs with cwd = workdir
REFERENCE_LOWPASS_A = 30.0


class RelionRunError(RuntimeError):
    """A RELION program failed; the message carries the command and its stderr tail."""


def shared_data_dir() -> Path:
    return Path(os.environ.get("OMLRELION_DATA", REPO.parent / "shared" / "data"))


def relion_program(name: str) -> str:
    """Absolute path of a RELION program (env folder, PATH, then the repo's bundle)."""
    env_dir = os.environ.get("OMLRELION_RELION_BIN")
    candidates = [Path(env_dir) / name] if env_dir else []
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    candidates += [REPO / ".relion" / "relion-bundle" / "bin" / name,
                   REPO / ".relion" / "build" / "relion-bundle" / "bin" / name]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise FileNotFoundError(f"RELION program {name!r} not found (set OMLRELION_RELION_BIN or PATH)")


def _have(name: str) -> bool:
    try:
        relion_program(name)
        return True
    except FileNotFoundError:
        return False


def _tail(text: str, n_lines: int = 40) -> str:
    # RELION's progress bars are long lines of dots; keep the informative end
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return "\n".join(ln[-300:] for ln in lines[-n_lines:])


def _run(cmd: Sequence[str], cwd: Path, env: dict, timeout: float, log_name: str) -> None:
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True,
                              errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise RelionRunError(f"timed out after {timeout:.0f} s: {shlex.join(cmd)}\n"
                             f"--- stderr tail ---\n{_tail(err)}") from None
    (cwd / f"{log_name}.stdout.txt").write_text(proc.stdout)
    (cwd / f"{log_name}.stderr.txt").write_text(proc.stderr)
    if proc.returncode != 0:
        raise RelionRunError(f"exit status {proc.returncode}: {shlex.join(cmd)} (cwd {cwd})\n"
                             f"--- stderr tail ---\n{_tail(proc.stderr)}\n"
                             f"--- stdout tail ---\n{_tail(proc.stdout, 10)}")


def write_particle_subset(src_star: Path, dst_star: Path, n_particles: int) -> int:
    """Copy a RELION 3.1 particle STAR keeping the first ``n_particles`` rows of
    ``data_particles``; image names are rewritten to absolute paths (RELION resolves
    them against its working directory, not the STAR file). Returns the rows kept."""
    src_dir = src_star.resolve().parent
    out, block, labels, kept, in_loop = [], None, [], 0, False
    for line in src_star.read_text().splitlines():
        s = line.strip()
        if s.startswith("data_"):
            block, labels, in_loop = s, [], False
        elif s == "loop_":
            in_loop = True
        elif in_loop and s.startswith("_"):
            labels.append(s.split()[0])
        elif block == "data_particles" and in_loop and s and not s.startswith("#"):
            if kept >= n_particles:
                continue
            tokens = s.split()
            if "_rlnImageName" in labels:
                i = labels.index("_rlnImageName")
                index, _, path = tokens[i].partition("@")
                if path and not Path(path).is_absolute():
                    tokens[i] = f"{index}@{src_dir / path}"
            line = " ".join(tokens)
            kept += 1
        out.append(line)
    dst_star.write_text("\n".join(out) + "\n")
    return kept


def _mpirun_command(n_ranks: int) -> list[str]:
    mpirun = relion_program("mpirun")
    cmd = [mpirun, "-n", str(n_ranks)]
    try:
        version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    if "Open MPI" in version or "OpenRTE" in version:
        # --noprefix: an mpirun called by absolute path would otherwise put its own bin/
        # first on the ranks' PATH, and so change which interpreter the external program gets
        cmd[1:1] = ["--oversubscribe", "--noprefix"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return cmd


def run_relion_refine_external(workdir: Path, executable: Path, n_particles: int = 300,
                               extra_args: Sequence[str] = (), *, auto_refine: bool | None = None,
                               timeout: float = 600.0) -> Path:
    """Build a particle subset and a 30 A low-passed reference in ``workdir``, run
    ``relion_refine --external_reconstruct`` with ``RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE``
    = ``executable`` and return the output folder (``workdir/refine``, files ``run_*``).

    ``executable`` is a program path (quoted for the shell) or, as a ``str`` containing
    spaces, a command line used verbatim (RELION appends the STAR file name and runs it
    through ``/bin/sh``). ``extra_args`` are appended to relion_refine's arguments.
    ``auto_refine``: True = MPI auto-refine with split halves (needs mpirun and
    relion_refine_mpi), False = serial 2-iteration refinement, None = the former when
    available. Raises RelionRunError with RELION's stderr tail if a program fails.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data = shared_data_dir() / "relion_sim64"
    src_star, truth = data / "particles.star", data / "ground_truth.mrc"
    if not src_star.is_file() or not truth.is_file():
        raise FileNotFoundError(f"shared test data not found in {data} (set OMLRELION_DATA)")
    if isinstance(executable, Path) or " " not in str(executable):
        exe_path = Path(executable).resolve()
        if not (exe_path.is_file() and os.access(exe_path, os.X_OK)):
            raise FileNotFoundError(f"external reconstruction program not executable: {exe_path}")
        exe_cmd = shlex.quote(str(exe_path))
    else:
        exe_cmd = str(executable)
    if auto_refine is None:
        auto_refine = _have("relion_refine_mpi") and _have("mpirun")

    star = workdir / "particles_subset.star"
    if write_particle_subset(src_star, star, n_particles) < n_particles:
        raise ValueError(f"{src_star} has fewer than {n_particles} particles")
    env = dict(os.environ, RELION_EXTERNAL_RECONSTRUCT_EXECUTABLE=exe_cmd)
    ref = workdir / "reference_lp30.mrc"
    _run([relion_program("relion_image_handler"), "--i", str(truth), "--o", ref.name,
          "--lowpass", str(REFERENCE_LOWPASS_A)], workdir, env, timeout, "image_handler")

    (workdir / OUTPUT_DIR).mkdir(exist_ok=True)
    common = ["--o", f"{OUTPUT_DIR}/run", "--i", star.name, "--ref", ref.name,
              "--ini_high", "30", "--particle_diameter", "250", "--ctf",
              "--healpix_order", "1", "--offset_range", "3", "--offset_step", "2",
              "--sym", "C1", "--pad", "2", "--external_reconstruct"]
    if auto_refine:
        cmd = _mpirun_command(3) + [relion_program("relion_refine_mpi"), "--auto_refine",
                                    "--split_random_halves", "--auto_iter_max", "1", *common]
    else:
        cmd = [relion_program("relion_refine"), "--iter", "2", "--K", "1", *common]
    _run(cmd + [str(a) for a in extra_args], workdir, env, timeout, "relion_refine")
    out = workdir / OUTPUT_DIR
    if not any(out.glob("*_external_reconstruct.star")):
        raise RelionRunError(f"relion_refine finished but made no external-reconstruct call in {out}")
    return out
