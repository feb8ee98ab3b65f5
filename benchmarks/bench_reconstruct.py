"""omlrelion reconstruct against relion_reconstruct on the same simulated particles, in one run.

For each box size: simulate particles (`omlrelion simulate`, phantom map, CTF, SNR 0.1), then time
  * relion_reconstruct --ctf (the whole command) on all particles, and on one particle (the
    reconstruction stage: sums to map, pad 2, 10 gridding iterations, plus process start-up);
  * omlrelion reconstruct --ctf --device DEVICE (the whole command, process start included), with
    its own per-stage times from --json (read, back-project, sums-to-map) and peak memory;
and compare the two maps (correlation). Prints a Markdown table; --out also writes it to a file.

  python benchmarks/bench_reconstruct.py --boxes 64 128 --particles 2000 --device cpu
  python benchmarks/bench_reconstruct.py --boxes 400 --particles 10000 --device gpu --no-relion
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np


def _run(cmd, cwd=None, env=None):
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(peak, before) * 1024


def _run_together(cmds, cwd=None):
    """Start the commands together; return (wall seconds, peak RSS of any child) for each."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    walls = [None] * len(procs)
    while any(w is None for w in walls):
        for i, proc in enumerate(procs):
            if walls[i] is None and proc.poll() is not None:
                walls[i] = time.perf_counter() - t0
        time.sleep(0.05)
    for cmd, proc in zip(cmds, procs):
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{out[-2000:]}\n{err[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return [(w, peak) for w in walls]


def device_name(device: str) -> str:
    if device.startswith("gpu"):
        import cupy as cp

        props = cp.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return f"{name} ({props['totalGlobalMem'] / 2**30:.0f} GiB)"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores"


def bench_box(box, n_particles, device, work: Path, relion: bool, angpix_for_box):
    folder = work / f"box{box}"
    folder.mkdir(parents=True, exist_ok=True)
    omlrelion = [sys.executable, "-m", "omlrelion"]
    angpix = angpix_for_box(box)
    t_sim, _ = _run(omlrelion + ["simulate", "--map", "phantom", "--box", str(box), "--angpix", str(angpix),
                                 "--n", str(n_particles), "--o", str(folder / "particles"), "--snr", "0.1",
                                 "--seed", "1", "--device", device, "--quiet"])
    row = {"box": box, "particles": n_particles, "simulate_s": t_sim}
    t_ours, _ = _run(omlrelion + ["reconstruct", "--i", str(folder / "particles.star"), "--o", str(folder / "ours.mrc"),
                                  "--ctf", "--device", device, "--json", str(folder / "ours.json"), "--quiet"])
    summary = json.loads((folder / "ours.json").read_text())
    t = summary["timings_s"]
    row.update(ours_total_s=t_ours, ours_read_s=t.get("read", 0.0) + t.get("read_star", 0.0),
               ours_backproject_s=t.get("backproject", 0.0),
               ours_sums_to_map_s=t.get("symmetrise", 0.0) + t.get("gridding", 0.0) + t.get("fft_to_map", 0.0),
               ours_peak_memory=summary["peak_memory"][0], precision=summary["precision"])
    if relion:
        one = folder / "one.star"
        lines = (folder / "particles.star").read_text().splitlines()
        # keep the optics block, the particle header and the first particle row
        last_header = max(i for i, line in enumerate(lines) if line.startswith("_rln"))
        one.write_text("\n".join(lines[:last_header + 2]) + "\n")
        # both RELION runs at once, on two of the machine's cores (relion_reconstruct is single-threaded)
        (t_rel, rss), (t_rel_stage, _) = _run_together(
            [["relion_reconstruct", "--i", "particles.star", "--o", "relion.mrc", "--ctf"],
             ["relion_reconstruct", "--i", "one.star", "--o", "relion_one.mrc", "--ctf"]], cwd=folder)
        ours = mrcfile.read(folder / "ours.mrc").astype(np.float64)
        theirs = mrcfile.read(folder / "relion.mrc").astype(np.float64)
        row.update(relion_total_s=t_rel, relion_stage_s=t_rel_stage, relion_peak_rss=rss,
                   cc_vs_relion=float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]))
    return row


def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(rows, device_label):
    cols = ["box", "particles", "precision", "relion total s", "ours total s", "total ratio",
            "relion sums-to-map s", "ours sums-to-map s", "stage ratio", "ours read s", "ours back-project s",
            "ours peak memory", "CC vs RELION"]
    out = [f"device: {device_label}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        mem = r["ours_peak_memory"]
        if "pool_bytes" in mem:
            mem_s = f"{mem['pool_bytes'] / 1e9:.2f} GB pool, {mem['driver_used_bytes'] / 1e9:.2f} GB driver"
        else:
            mem_s = f"{mem['peak_rss_bytes'] / 1e9:.2f} GB RSS"
        rel, stage = r.get("relion_total_s"), r.get("relion_stage_s")
        cells = [str(r["box"]), str(r["particles"]), r["precision"], _fmt(rel, ".1f"), _fmt(r["ours_total_s"], ".2f"),
                 _fmt(rel and rel / r["ours_total_s"], ".0f", "x"), _fmt(stage, ".1f"),
                 _fmt(r["ours_sums_to_map_s"], ".3f"), _fmt(stage and stage / r["ours_sums_to_map_s"], ".0f", "x"),
                 _fmt(r["ours_read_s"], ".2f"), _fmt(r["ours_backproject_s"], ".3f"), mem_s,
                 _fmt(r.get("cc_vs_relion"), ".5f")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--particles", type=int, nargs="+", default=[2000],
                   help="particles per box (one value for all, or one per box)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-relion", dest="relion", action="store_false")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=None, help="also write the table (Markdown) here")
    p.add_argument("--json", type=Path, default=None, help="also write the raw rows here")
    args = p.parse_args(argv)
    if args.relion and shutil.which("relion_reconstruct") is None:
        sys.exit("relion_reconstruct not on the PATH (use --no-relion)")
    counts = args.particles * len(args.boxes) if len(args.particles) == 1 else args.particles
    work = args.work or Path(tempfile.mkdtemp(prefix="omlrelion-bench-"))
    label = device_name(args.device)
    rows = []
    for box, n in zip(args.boxes, counts):
        rows.append(bench_box(box, n, args.device, work, args.relion, lambda b: round(325.0 / b, 4)))
        print(table(rows[-1:], label).splitlines()[-1], flush=True)
    text = table(rows, label)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"device": label, "rows": rows}, indent=2, default=float))


if __name__ == "__main__":
    main()
