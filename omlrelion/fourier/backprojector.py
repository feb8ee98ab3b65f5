"""Back-projection: insert 2D image transforms into the padded 3D half grid.

Data and weight accumulate in projector-centred layout (see `fourier.layout`) on the grid of
`geometry.grids.PaddedGrid`. For every image pixel at padded position p (`fourier.interp`):

* skip the x = 0 pixel of negative-y rows, pixels with weight <= 0 and pixels outside the sphere
  |p|^2 = pad^2 (x^2 + y^2) > R^2 (tested on the exact integer pixel radius: RELION's test on the
  rotated position decides the pixels lying exactly on the sphere, |p| = R, by rounding noise);
* trilinear (default): fold p_x < 0 to -p (conjugating the value), then distribute value and weight
  over the 8 neighbours with the trilinear fractions;
* nearest neighbour (`nn=True`, used only where |p| >= round(pad * r_min_nn), again on the exact
  pixel radius): round p (halves away from zero), fold, add to one voxel.

One function, two implementations: NumPy (vectorised, any float dtype, the reference) and CuPy (a
CUDA kernel with atomic adds, float32 or float64). Both add in place into the accumulators.
"""

from __future__ import annotations

import numpy as np

from omlrelion.backend import cp, is_gpu_array
from omlrelion.fourier.interp import image_pixel_xy, slice_positions
from omlrelion.units import relion_round


HOST_CHUNK_PIXELS = 1 << 20     # image pixels inserted at once on the host


def insert_slices(data_ftc, weight_ftc, images_ft, weights_ft, rotations, *, pad: float,
                  r_padded: int, nn: bool = False, r_min_nn: float = 10.0) -> None:
    """Add m image transforms and their weights into `data_ftc` and `weight_ftc`, in place.

    Parameters
    ----------
    data_ftc : complex (P, P, P//2+1), projector-centred, P = 2 (r_padded + 1) + 1.
    weight_ftc : real, same shape.
    images_ft : complex (m, n, n//2+1), corner layout (already centred, shifted, CTF-weighted).
    weights_ft : real (m, n, n//2+1) (CTF^2 or ones).
    rotations : (m, 3, 3) RELION matrices A of the images.
    pad : padding factor (times any optics-group scale factor).
    r_padded : sphere radius R in padded voxels; pixels beyond it are not inserted.
    """
    if images_ft.shape[0] == 0:
        return
    if is_gpu_array(data_ftc):
        _insert_cuda(data_ftc, weight_ftc, images_ft, weights_ft, rotations, pad, r_padded, nn, r_min_nn)
    else:
        # in chunks of images: the host path's temporaries (positions, 8 corners, weights) are ~100
        # bytes a pixel, so a whole E-step batch of (particle, orientation) pairs would take GBs
        m, n, nh = images_ft.shape
        step = max(1, HOST_CHUNK_PIXELS // (n * nh))
        for start in range(0, m, step):
            part = slice(start, start + step)
            _insert_numpy(data_ftc, weight_ftc, images_ft[part], weights_ft[part], np.asarray(rotations)[part],
                          pad, r_padded, nn, r_min_nn)


def _insert_numpy(data, weight, images_ft, weights_ft, rotations, pad, r_padded, nn, r_min_nn):
    real = weight.dtype.type
    m, n, nh = images_ft.shape
    size, half = data.shape[0], data.shape[2]
    c = size // 2
    x, y, keep = image_pixel_xy(n, np, np.float64)
    keep &= (x * x + y * y) * (pad * pad) <= r_padded * r_padded
    p = slice_positions(np.asarray(rotations), n, pad, np, real)[:, keep]        # (m, k, 3)
    v = np.asarray(images_ft).reshape(m, -1)[:, keep].astype(data.dtype, copy=False)
    w = np.asarray(weights_ft).reshape(m, -1)[:, keep].astype(real, copy=False)
    ok = w > 0
    p, v, w = p[ok], v[ok], w[ok]
    if nn:   # exact pixel radius, as for the sphere: |p|^2 = pad^2 (x^2 + y^2)
        pixel_r2 = np.broadcast_to(((x * x + y * y) * (pad * pad))[keep], (m, int(keep.sum())))[ok]
        use_nn = pixel_r2 >= relion_round(r_min_nn * pad) ** 2
    else:
        use_nn = np.zeros(len(p), bool)

    flat_idx, flat_val, flat_w = [], [], []
    if use_nn.any():
        q = np.where(p[use_nn] >= 0, np.floor(p[use_nn] + 0.5), -np.floor(-p[use_nn] + 0.5)).astype(np.int64)
        vq, wq = v[use_nn], w[use_nn]
        flip = q[:, 0] < 0
        q[flip] *= -1
        vq = np.where(flip, np.conj(vq), vq)
        inside = np.all((q[:, 1:] >= -c) & (q[:, 1:] <= c), axis=1) & (q[:, 0] < half)
        idx = ((q[inside, 2] + c) * size + (q[inside, 1] + c)) * half + q[inside, 0]
        flat_idx.append(idx), flat_val.append(vq[inside]), flat_w.append(wq[inside])
    tri = ~use_nn
    if tri.any():
        pt, vt, wt = p[tri], v[tri], w[tri]
        flip = pt[:, 0] < 0
        pt = np.where(flip[:, None], -pt, pt)
        vt = np.where(flip, np.conj(vt), vt)
        p0 = np.floor(pt)
        f = pt - p0
        p0 = p0.astype(np.int64)
        inside = (p0[:, 0] >= 0) & (p0[:, 0] + 1 < half) & np.all((p0[:, 1:] >= -c) & (p0[:, 1:] + 1 <= c), axis=1)
        p0, f, vt, wt = p0[inside], f[inside], vt[inside], wt[inside]
        base = ((p0[:, 2] + c) * size + (p0[:, 1] + c)) * half + p0[:, 0]
        for dz in (0, 1):
            fz = f[:, 2] if dz else 1 - f[:, 2]
            for dy in (0, 1):
                fy = f[:, 1] if dy else 1 - f[:, 1]
                for dx in (0, 1):
                    fx = f[:, 0] if dx else 1 - f[:, 0]
                    frac = fz * fy * fx
                    flat_idx.append(base + (dz * size + dy) * half + dx)
                    flat_val.append(frac * vt)
                    flat_w.append(frac * wt)
    if not flat_idx:
        return
    idx = np.concatenate(flat_idx)
    val = np.concatenate(flat_val)
    wts = np.concatenate(flat_w)
    total = data.size
    dflat = data.reshape(-1)
    wflat = weight.reshape(-1)
    dflat.real += np.bincount(idx, weights=val.real, minlength=total).astype(real, copy=False)
    dflat.imag += np.bincount(idx, weights=val.imag, minlength=total).astype(real, copy=False)
    wflat += np.bincount(idx, weights=wts, minlength=total).astype(real, copy=False)


_KERNEL_SOURCE = r"""
template<typename T>
__device__ __forceinline__ long long relion_round(T v) {
    return v >= 0 ? (long long)floor(v + (T)0.5) : -(long long)floor(-v + (T)0.5);
}

template<typename T, typename C>
__global__ void insert_kernel(const C* __restrict__ images, const T* __restrict__ weights,
                              const T* __restrict__ mats, T* data, T* weight,
                              const int m, const int n, const int nh, const int size, const int half,
                              const int r_padded, const double pad2, const double r_min_nn2, const int nn)
{
    const long long npix = (long long)n * nh;
    const long long total = npix * m;
    const int c = size / 2;
    const double r2max = (double)r_padded * (double)r_padded;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const int img = (int)(t / npix);
        const int pix = (int)(t - (long long)img * npix);
        const int row = pix / nh;
        const int x = pix - row * nh;
        const int y = row < n / 2 + 1 ? row : row - n;
        if (x == 0 && y < 0) continue;
        const double pixel_r2 = (double)(x * x + y * y) * pad2;
        if (pixel_r2 > r2max) continue;
        const T w = weights[t];
        if (!(w > (T)0)) continue;
        const T* a = mats + 6 * (long long)img;
        T px = a[0] * x + a[3] * y;
        T py = a[1] * x + a[4] * y;
        T pz = a[2] * x + a[5] * y;
        C v = images[t];
        if (nn && pixel_r2 >= r_min_nn2) {
            long long qx = relion_round(px), qy = relion_round(py), qz = relion_round(pz);
            if (qx < 0) { qx = -qx; qy = -qy; qz = -qz; v.y = -v.y; }
            if (qx >= half || qy < -c || qy > c || qz < -c || qz > c) continue;
            const long long idx = ((qz + c) * size + (qy + c)) * half + qx;
            atomicAdd(data + 2 * idx, v.x);
            atomicAdd(data + 2 * idx + 1, v.y);
            atomicAdd(weight + idx, w);
            continue;
        }
        if (px < 0) { px = -px; py = -py; pz = -pz; v.y = -v.y; }
        const T fx0 = floor(px), fy0 = floor(py), fz0 = floor(pz);
        const int x0 = (int)fx0, y0 = (int)fy0, z0 = (int)fz0;
        if (x0 < 0 || x0 + 1 >= half || y0 < -c || y0 + 1 > c || z0 < -c || z0 + 1 > c) continue;
        const T fx = px - fx0, fy = py - fy0, fz = pz - fz0;
        const long long base = ((long long)(z0 + c) * size + (y0 + c)) * half + x0;
        #pragma unroll
        for (int dz = 0; dz < 2; ++dz) {
            const T wz = dz ? fz : (T)1 - fz;
            #pragma unroll
            for (int dy = 0; dy < 2; ++dy) {
                const T wzy = wz * (dy ? fy : (T)1 - fy);
                #pragma unroll
                for (int dx = 0; dx < 2; ++dx) {
                    const T f = wzy * (dx ? fx : (T)1 - fx);
                    const long long idx = base + ((long long)dz * size + dy) * half + dx;
                    atomicAdd(data + 2 * idx, f * v.x);
                    atomicAdd(data + 2 * idx + 1, f * v.y);
                    atomicAdd(weight + idx, f * w);
                }
            }
        }
    }
}
"""

_module = None


def _kernel(real_dtype):
    global _module
    if _module is None:
        _module = cp.RawModule(code=_KERNEL_SOURCE, options=("-std=c++17",),
                               name_expressions=("insert_kernel<float, float2>",
                                                 "insert_kernel<double, double2>"))
    name = "insert_kernel<float, float2>" if real_dtype == np.float32 else "insert_kernel<double, double2>"
    return _module.get_function(name)


def _insert_cuda(data, weight, images_ft, weights_ft, rotations, pad, r_padded, nn, r_min_nn):
    real = weight.dtype
    if data.dtype != np.result_type(real, np.complex64):
        raise TypeError(f"data {data.dtype} and weight {real} accumulators do not match")
    m, n, nh = images_ft.shape
    images_ft = cp.ascontiguousarray(images_ft, dtype=data.dtype)
    weights_ft = cp.ascontiguousarray(weights_ft, dtype=real)
    rot = cp.asarray(rotations, dtype=cp.float64) * pad
    mats = cp.ascontiguousarray(rot[:, :2, :].reshape(m, 6), dtype=real)
    size, half = data.shape[0], data.shape[2]
    total = m * n * nh
    threads = 256
    blocks = int(min((total + threads - 1) // threads, 65535 * 8))
    _kernel(real)((blocks,), (threads,),
                  (images_ft, weights_ft, mats, data.view(real), weight,
                   np.int32(m), np.int32(n), np.int32(nh), np.int32(size), np.int32(half),
                   np.int32(r_padded), np.float64(pad * pad), np.float64(relion_round(r_min_nn * pad) ** 2),
                   np.int32(1 if nn else 0)))
