"""Time refinement iterations of RELION (`relion_refine_mpi --auto_refine`, CPU) and `omlrelion refine`
(GPU) at matched settings, in one run on one machine.

Both get the particle set of `refine_vs_relion.py prepare` (the ribosome map at the box, SNR 0.05,
random initial angles), the start map low-passed to 30 A, HEALPix order 2 (local from 4), offsets 5 px
in steps of 2 px, oversampling 1, pad 2, gridding on, particle diameter 280 A, zero-masked images,
solvent flattening and the halves joined below 40 A. RELION runs until it has written --iters
iterations, then is stopped; its iteration k takes the time between its it(k-1) and it(k) model files.
Ours runs the same number of iterations through `refine.autorefine.refine`, twice: the second run is
timed, with CuPy's kernels compiled and cached as on any machine that ran omlrelion before (`--cold`
times the first; its iteration 1 then includes the compilation, about 30 s on a fresh machine).
Iteration 1 includes the images' transforms. Per iteration: wall time, the image size used
(RELION's rlnCurrentImageSize, ours current_size), peak memory (RELION: the largest sum of its
processes' resident sets; ours: CuPy's pool, which keeps its high-water mark, plus the host process's
resident set) and our E-step evaluations (particle x orientation x translation pairs whose squared
difference was computed) per second.

  python benchmarks/bench_refine_vs_relion.py --box 128 --n 5000 --iters 2 --mpi 17 --work /tmp/bench
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from refine_vs_relion import INI_HIGH_A, PARTICLE_DIAMETER_A, relion_options  # noqa: E402


def _rss_bytes(pids) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _descendants(root: int) -> list[int]:
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        todo.extend(int(c) for c in children)
    return out


def run_relion(work: Path, iters: int, mpi: int) -> list[dict]:
    out = work / "relion"
    out.mkdir(exist_ok=True)
    cmd = relion_options(mpi, 1)
    log = open(out / "log.txt", "w")
    t0 = time.time()
    # OpenMPI's shared-memory single-copy path fails in containers without ptrace rights
    env = dict(os.environ, OMPI_MCA_btl_vader_single_copy_mechanism="none")
    proc = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    peak = 0
    target = out / f"run_it{iters:03d}_half2_model.star"
    while proc.poll() is None and not target.exists():
        peak = max(peak, _rss_bytes(_descendants(proc.pid)))
        time.sleep(0.5)
    time.sleep(1.0)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    log.close()
    if not target.exists():
        tail = (out / "log.txt").read_text(errors="replace").replace("\r", "\n").splitlines()[-25:]
        raise SystemExit(f"RELION stopped before iteration {iters}:\n" + "\n".join(tail))
    rows, last = [], t0
    for k in range(0, iters + 1):
        model = out / f"run_it{k:03d}_half1_model.star"
        stamp = model.stat().st_mtime
        if k:
            size = [ln.split()[1] for ln in model.read_text().splitlines() if ln.startswith("_rlnCurrentImageSize")]
            rows.append({"iteration": k, "seconds": stamp - last, "size": int(size[0]), "peak_bytes": peak})
        last = stamp
    return rows


def run_ours(work: Path, iters: int, device_name: str) -> list[dict]:
    from omlrelion.backend import parse_device
    from omlrelion.cli.refine import _load_images
    from omlrelion.io.mrc import read_map
    from omlrelion.io.star import read_particles
    from omlrelion.refine import expectation
    from omlrelion.refine.autorefine import RefineOptions, refine

    device = parse_device(device_name)[0]
    particles = read_particles(work / "particles_start.star")
    images = _load_images(particles)
    start, _ = read_map(work / "start.mrc")
    opts = RefineOptions(healpix_order=2, offset_range_px=5, offset_step_px=2, pad=2, ini_high_A=INI_HIGH_A,
                         n_iter=1, oversampling=1, auto_local_order=4, particle_diameter_A=PARTICLE_DIAMETER_A,
                         auto_refine=True, zero_mask=True, flatten_solvent=True, low_resol_join_A=40.0)
    # iteration 1 includes the images' transforms and CuPy's first-use kernel compilation
    pool = None
    if device.gpu is not None:
        import cupy

        pool = cupy.get_default_memory_pool()
    rows, clock = [], [0.0, 0]

    def after(state) -> None:
        if pool is not None:
            cupy.cuda.Device().synchronize()
        now = time.perf_counter()
        h = state.history[-1]
        rows.append({"iteration": len(state.history), "seconds": now - clock[0], "size": h["current_size"],
                     "peak_bytes": (pool.total_bytes() if pool is not None else 0) + _rss_bytes([os.getpid()]),
                     "evaluations": expectation.EVALUATIONS[0] - clock[1], "order": h["healpix_order"],
                     "resolution_A": h["resolution_A"]})
        clock[0], clock[1] = now, expectation.EVALUATIONS[0]

    clock[0], clock[1] = time.perf_counter(), expectation.EVALUATIONS[0]
    refine(images, particles.ctf_params(), particles.optics[0], particles.random_subset, start,
           replace(opts, n_iter=iters), device=device, on_iteration=after, initial_eulers=particles.eulers_deg,
           initial_shifts_px=particles.shifts_px)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--mpi", type=int, default=17, help="RELION's MPI ranks (leader + workers)")
    p.add_argument("--map", default=None, help="default: $OMLRELION_DATA/clean70SRibosome_vol_65p.mrc")
    p.add_argument("--device", default="gpu")
    p.add_argument("--work", required=True)
    p.add_argument("--skip-relion", action="store_true")
    p.add_argument("--cold", dest="warm", action="store_false",
                   help="time our first run (with CuPy's kernel compilation) instead of a second one")
    args = p.parse_args(argv)
    work = Path(args.work)
    source = args.map or str(Path(os.environ.get("OMLRELION_DATA", "../shared/data")) / "clean70SRibosome_vol_65p.mrc")
    subprocess.run([sys.executable, str(Path(__file__).with_name("refine_vs_relion.py")), "prepare", "--map", source,
                    "--source-angpix", "5", "--box", str(args.box), "--n", str(args.n), "--snr", "0.05",
                    "--o", str(work)], check=True)
    if args.warm:       # CuPy compiles its kernels on first use and caches them: time a second run
        run_ours(work, args.iters, args.device)
    ours = run_ours(work, args.iters, args.device)
    for o in ours:
        print(f"ours iteration {o['iteration']}: {o['seconds']:.2f} s, size {o['size']}, order {o['order']}, "
              f"{o['peak_bytes'] / 1e9:.2f} GB, {o['evaluations'] / o['seconds']:.3g} evaluations/s", flush=True)
    relion = [] if args.skip_relion else run_relion(work, args.iters, args.mpi)
    name = args.device
    try:
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:  # noqa: BLE001 - a CPU run names no GPU
        pass
    print(f"\nbox {args.box}, {args.n} particles; ours on {name}; RELION 3.1.3 with {args.mpi} MPI ranks "
          f"on {os.cpu_count()} CPU cores")
    print("| iteration | RELION s | RELION size | RELION peak GB | ours s | ours size | ours order | "
          "ours peak GB | speed-up | E-step evaluations/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, o in enumerate(ours):
        r = relion[i] if i < len(relion) else None
        cells = [str(o["iteration"]), f"{r['seconds']:.1f}" if r else "-", str(r["size"]) if r else "-",
                 f"{r['peak_bytes'] / 1e9:.2f}" if r else "-", f"{o['seconds']:.2f}", str(o["size"]), str(o["order"]),
                 f"{o['peak_bytes'] / 1e9:.2f}", f"{r['seconds'] / o['seconds']:.1f}x" if r else "-",
                 f"{o['evaluations'] / o['seconds']:.3g}"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
