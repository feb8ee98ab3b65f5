"""Where the sums-to-map step spends its time on one device, against the FFT floor.

For each box: the reconstruction of random padded sums (pad 2, full resolution, 10 gridding
iterations), split into the gridding loop and the final window + inverse FFT, next to the time of
one dense r2c + c2r pair on RELION's odd grid P and on the next FFT-friendly size (2^a 3^b 5^c 7^d).
Also times back-projecting particles (synthetic images already in memory) per 10,000.

  python benchmarks/profile_sums_to_map.py --boxes 256 400 --device gpu
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from omlrelion.backend import parse_device
from omlrelion.ctf.ctf import CtfParams
from omlrelion.ctf.optics import Optics
from omlrelion.geometry.euler import euler_to_matrix
from omlrelion.geometry.grids import PaddedGrid, fft_friendly_size
from omlrelion.reconstruct.gridding import reconstruct_map
from omlrelion.reconstruct.insert import CtfMode, insert_particles


def _timed(fn, sync, repeat=3):
    fn()
    sync()
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--boxes", type=int, nargs="+", default=[64])
    p.add_argument("--device", default="cpu")
    p.add_argument("--particles", type=int, default=10000)
    args = p.parse_args(argv)
    dev = parse_device(args.device)[0]
    xp = dev.xp
    sync = dev.synchronize
    rng = np.random.default_rng(0)
    real = np.float32 if dev.gpu is not None else np.float64
    print(f"device: {dev.name}")
    print("| box | P | FFT pair on P s | friendly size | FFT pair friendly s | sums-to-map s | gridding loop s "
          "| window+inverse s | loop / (10 FFT pairs on P) | back-project per 10k particles s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for box in args.boxes:
        grid = PaddedGrid(box, 2.0, box // 2)
        size = grid.size
        with dev.use():
            vol = xp.asarray(rng.random((size, size, size), dtype=np.float32)).astype(real)

            def pair(v=vol, s=size):
                f = xp.fft.rfftn(v, norm="forward")
                xp.fft.irfftn(f, s=(s, s, s), axes=(0, 1, 2), norm="forward")

            t_pair = _timed(pair, sync)
            del vol
            fsize = fft_friendly_size(size)
            volf = xp.zeros((fsize, fsize, fsize), dtype=real)
            t_pair_f = _timed(lambda: pair(volf, fsize), sync)
            del volf
            weight = xp.asarray(rng.random(grid.shape)).astype(real) + 0.5
            data = (weight * 0.1).astype(np.result_type(real, np.complex64))
            timings = {}
            t_total = _timed(lambda: reconstruct_map(data, weight, box_size=box, timings=timings.clear() or timings),
                             sync, repeat=2)
            del data, weight
            # back-projection of synthetic particles, CTF on, prepared on the device
            n = args.particles
            batch = 512
            optics = Optics(angpix=1.0, voltage_kv=300, cs_mm=2.7, amp_contrast=0.1, box_size=box)
            d3 = xp.zeros(grid.shape, dtype=np.result_type(real, np.complex64))
            w3 = xp.zeros(grid.shape, dtype=real)
            images = xp.asarray(rng.normal(size=(batch, box, box)).astype(real))
            eulers = rng.uniform([-180, 0, -180], [180, 180, 180], size=(batch, 3))
            shifts = rng.uniform(-3, 3, size=(batch, 2))
            ctf = CtfParams(*(np.full(batch, v) for v in (15000.0, 14800.0, 30.0, 0.0, 0.0, 1.0)))

            def backproject():
                for _ in range(n // batch):
                    insert_particles(d3, w3, images, euler_to_matrix(eulers), shifts, optics, ctf,
                                     mode=CtfMode(apply=True), pad=2.0, r_padded=grid.r_padded)

            t_bp = _timed(backproject, sync, repeat=1) * 10000 / (n // batch * batch)
            del d3, w3, images
        print(f"| {box} | {size} | {t_pair:.4f} | {fsize} | {t_pair_f:.4f} | {t_total:.3f} | "
              f"{timings.get('gridding', 0):.3f} | {timings.get('fft_to_map', 0):.3f} | "
              f"{timings.get('gridding', 0) / (10 * t_pair):.2f} | {t_bp:.3f} |", flush=True)


if __name__ == "__main__":
    main()
