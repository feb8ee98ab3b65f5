"""Symmetrisation of back-projected Fourier accumulators, as RELION 3.1 does it.

``BackProjector::symmetrise`` (``src/backprojector.cpp``) runs, in this order, on the data
(complex) and weight (real) accumulators:

1. ``enforceHermitianSymmetry``: :func:`hermitian_repair` here;
2. helical symmetry (only with ``--nr_helical_asu > 1``; not implemented here);
3. ``applyPointGroupSymmetry``: :func:`symmetrise` here, with the matrices of
   :func:`omlrelion.geometry.symmetry.point_group_matrices`.

Layout ("projector-centred" half grid, RELION's ``Projector`` data array): arrays of shape
``(P, P, H)`` indexed ``[z, y, x]`` with ``P = 2 (R + 1) + 1`` odd and ``H = P // 2 + 1 = R + 2``;
logical ``x`` in ``[0, R + 1]`` at index ``x``; logical ``y, z`` in ``[-(R + 1), R + 1]`` at index
``+ R + 1``; DC at ``[R + 1, R + 1, 0]``. Only ``x >= 0`` is stored; the rest is implied by
``V(-k) = conj V(k)`` (weight even).

Both functions take numpy or cupy arrays (the arrays decide) in complex64/float32 or
complex128/float64 and keep that precision. Point-group sampling positions are always computed
in float64, as RELION does. On cupy arrays :func:`symmetrise` runs one fused CUDA kernel
(one thread per output voxel, operators looped inside, compiled without FMA contraction) that
performs the same operations in the same order as the vectorised xp code used for numpy.
"""

from __future__ import annotations

import numpy as np

from omlrelion.backend import cp, get_xp, is_gpu_array, to_numpy
from omlrelion.errors import InputError

__all__ = ["hermitian_repair", "symmetrise"]

_IDENTITY_TOL = 1e-6  # RELION's Matrix2D::isIdentity tolerance
_PAIRS = {np.dtype(np.complex64): np.dtype(np.float32), np.dtype(np.complex128): np.dtype(np.float64)}


def hermitian_repair(data_ftc, weight_ftc) -> None:
    """Make the x = 0 plane Hermitian-consistent by summing each point with its mirror (in place).

    RELION's ``BackProjector::enforceHermitianSymmetry``: for every pair of logical points
    ``a = (z, y, 0)`` and ``b = (-z, -y, 0)`` with ``a != b``, ``data[a] <- data[a] + conj(data[b])``,
    ``data[b] <- conj(data[a])`` (the new value) and ``weight[a] = weight[b] <- weight[a] +
    weight[b]``. A sum, not an average: each side of the plane held only part of the insertions.
    The DC voxel ``[R + 1, R + 1, 0]`` and every voxel with ``x > 0`` are left alone.

    Parameters
    ----------
    data_ftc : complex64 or complex128 array, (P, P, H), projector-centred layout
        Modified in place.
    weight_ftc : float32 or float64 array, (P, P, H), same layout and precision
        Modified in place.

    Returns
    -------
    None
    """
    size = _check_pair(data_ftc, weight_ftc)
    xp = get_xp(data_ftc, weight_ftc)
    c = size // 2
    plane = data_ftc[:, :, 0]
    wplane = weight_ftc[:, :, 0]
    # index of logical -z is P - 1 - index of z, so the mirror of the plane is plane[::-1, ::-1].
    # a + conj(b) and b + conj(a) are bit for bit RELION's fsum and conj(fsum).
    new_plane = plane + xp.conj(plane[::-1, ::-1])
    new_wplane = wplane + wplane[::-1, ::-1]
    new_plane[c, c] = plane[c, c]
    new_wplane[c, c] = wplane[c, c]
    data_ftc[:, :, 0] = new_plane
    weight_ftc[:, :, 0] = new_wplane


def symmetrise(data_ftc, weight_ftc, matrices, r_max_padded: int, *, chunk_voxels: int = 1 << 22):
    """Point-group symmetrisation of data and weight (RELION ``applyPointGroupSymmetry``).

    For every stored voxel ``k = (x, y, z)`` (logical) with ``|k|^2 <= r_max_padded^2``:
    ``out[k] = in[k] + sum over non-identity R of trilinear(in, R @ k)``, for data and weight
    alike, always sampling the *input* arrays. A sample position ``p = R @ k`` with ``p_x < 0``
    is folded to ``-p`` and the interpolated data value conjugated (weight unchanged). Voxels
    outside the sphere keep their input values. There is no division by the group order.

    Call :func:`hermitian_repair` first, as RELION does: the folding assumes a Hermitian-
    consistent x = 0 plane.

    Trilinear sampling matches RELION's: corner ``(x0, y0, z0) = FLOOR(p)`` (RELION's macro,
    which differs from ``floor`` just above negative integers), fractions ``p - (x0, y0, z0)``,
    interpolation along x, then y, then z as ``l + (h - l) * t``, positions in float64. With
    complex128/float64 arrays and RELION's matrices the result equals RELION 3.1.3's
    ``applyPointGroupSymmetry`` bit for bit (checked on random accumulators).

    RELION checks no bounds (its ``CHECK_SIZE`` guard is compiled out): it relies on
    ``|R @ k| = |k| <= R_pad`` and the one-voxel margin of the ``P = 2 (R + 1) + 1`` grid, so all
    8 corners always lie inside the array and no sample is ever clipped or zero-filled. This
    function enforces the same preconditions (``r_max_padded`` at most the grid's ``R``, matrices
    orthogonal) and so never reads outside the array either.

    Parameters
    ----------
    data_ftc : complex64 or complex128 array, (P, P, H), projector-centred layout
        Not modified.
    weight_ftc : float32 or float64 array, (P, P, H), same layout and precision
        Not modified.
    matrices : float array, (n, 3, 3), numpy or cupy
        Group operators acting on column vectors ``(x, y, z)``, as returned by
        ``point_group_matrices`` (RELION samples at ``R @ k`` with its stored ``R``; over a whole
        group ``R`` and ``R^T`` give the same sum). Identity matrices (within 1e-6) are skipped:
        the identity copy is the input itself.
    r_max_padded : int
        ``R = round(pad * r_max)``, the sphere radius in padded voxels (RELION's
        ``ROUND(r_max * padding_factor)``); at most ``(P - 3) // 2``.
    chunk_voxels : int, optional
        NumPy path: voxels processed at once (z-planes are grouped up to this many), bounding
        temporary memory at roughly 250 bytes per voxel. The CUDA kernel needs no temporaries
        and ignores it.

    Returns
    -------
    (sum_data, sum_weight) : new arrays, same shape, dtype and device as the inputs
        (the inputs are read throughout, so the result cannot overwrite them).
    """
    size = _check_pair(data_ftc, weight_ftc)
    r_grid = (size - 3) // 2
    radius = _check_radius(r_max_padded, r_grid)
    operators = _operators(matrices, radius)
    if not isinstance(chunk_voxels, (int, np.integer)) or chunk_voxels < 1:
        raise InputError(f"chunk_voxels must be a positive integer, got {chunk_voxels!r}")

    if is_gpu_array(data_ftc):
        return _symmetrise_cuda(data_ftc, weight_ftc, operators, radius)
    return _symmetrise_xp(data_ftc, weight_ftc, operators, radius, int(chunk_voxels))


def _symmetrise_xp(data_ftc, weight_ftc, operators, radius: int, chunk_voxels: int):
    """Vectorised xp implementation (numpy; also runs on cupy arrays)."""
    xp = get_xp(data_ftc, weight_ftc)
    sum_data = data_ftc.copy()
    sum_weight = weight_ftc.copy()
    if not operators:
        return sum_data, sum_weight

    shape = data_ftc.shape
    data_flat = xp.ascontiguousarray(data_ftc).reshape(-1)
    weight_flat = xp.ascontiguousarray(weight_ftc).reshape(-1)
    out_data = sum_data.reshape(-1)
    out_weight = sum_weight.reshape(-1)
    real = weight_ftc.dtype
    per_plane = (2 * radius + 1) * (radius + 1)
    step = max(1, chunk_voxels // per_plane)
    for z_lo in range(-radius, radius + 1, step):
        z_hi = min(z_lo + step, radius + 1)
        flat, x, y, z = _sphere_voxels(xp, z_lo, z_hi, radius, shape)
        if flat.size == 0:
            continue
        acc_data = data_flat[flat]
        acc_weight = weight_flat[flat]
        for op in operators:  # RELION's order: in + op_1 + op_2 + ...
            d, w = _sample(xp, data_flat, weight_flat, op, x, y, z, shape, real)
            acc_data += d
            acc_weight += w
        out_data[flat] = acc_data
        out_weight[flat] = acc_weight
    return sum_data, sum_weight


# ------------------------------------------------------------------------------------------------


def _check_pair(data_ftc, weight_ftc) -> int:
    """Validate the (P, P, H) projector-centred pair; return P."""
    for name, a in (("data_ftc", data_ftc), ("weight_ftc", weight_ftc)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise InputError(f"{name} must be a numpy or cupy array, got {type(a).__name__}")
    shape = tuple(data_ftc.shape)
    if len(shape) != 3 or shape[0] != shape[1] or shape[0] % 2 == 0 or shape[2] != shape[0] // 2 + 1:
        raise InputError(
            f"data_ftc must have the projector-centred shape (P, P, P//2+1) with P odd, got {shape}")
    if shape[0] < 5:
        raise InputError(f"data_ftc: the grid side P = {shape[0]} is too small (P = 2(R+1)+1 >= 5)")
    if tuple(weight_ftc.shape) != shape:
        raise InputError(f"weight_ftc must have the shape of data_ftc {shape}, got {tuple(weight_ftc.shape)}")
    expected_real = _PAIRS.get(np.dtype(data_ftc.dtype))
    if expected_real is None:
        raise InputError(f"data_ftc must be complex64 or complex128, got {data_ftc.dtype}")
    if np.dtype(weight_ftc.dtype) != expected_real:
        raise InputError(
            f"weight_ftc must be {expected_real} to match data_ftc ({data_ftc.dtype}), got {weight_ftc.dtype}")
    if is_gpu_array(data_ftc) != is_gpu_array(weight_ftc):
        raise InputError("data_ftc and weight_ftc must live on the same device (both numpy or both cupy)")
    return shape[0]


def _check_radius(r_max_padded, r_grid: int) -> int:
    try:
        radius = int(r_max_padded)
        ok = radius == r_max_padded
    except (TypeError, ValueError):
        ok = False
    if not ok or not 0 <= radius <= r_grid:
        raise InputError(
            f"r_max_padded must be an integer in [0, {r_grid}] for this grid (R = (P-3)/2 = {r_grid}), "
            f"got {r_max_padded!r}; pass round(pad * r_max)")
    return radius


def _operators(matrices, radius: int):
    """Host float64 3x3 operators without the identity, as tuples of Python floats."""
    mats = np.asarray(to_numpy(matrices), dtype=np.float64)
    if mats.ndim != 3 or mats.shape[1:] != (3, 3):
        raise InputError(f"matrices must have shape (n, 3, 3), got {mats.shape}")
    if not np.isfinite(mats).all():
        raise InputError("matrices contain NaN or infinite values")
    # |R k| <= |k| (1 + 0.5/(R+1)) keeps every trilinear corner inside the (P, P, H) grid
    norms = np.linalg.norm(mats, ord=2, axis=(1, 2)) if len(mats) else np.zeros(0)
    if (norms > 1 + 0.5 / (radius + 1)).any() or (np.abs(np.linalg.det(mats)) < 0.5).any():
        raise InputError("matrices must be orthogonal (rotations or reflections), e.g. from "
                         "omlrelion.geometry.symmetry.point_group_matrices")
    eye = np.eye(3)
    return [tuple(tuple(float(v) for v in row) for row in m)
            for m in mats if np.abs(m - eye).max() > _IDENTITY_TOL]


def _sphere_voxels(xp, z_lo: int, z_hi: int, radius: int, shape):
    """Stored voxels with logical z in [z_lo, z_hi) and |k|^2 <= radius^2.

    Returns flat indices into the (P, P, H) array and the logical x, y, z as float64.
    """
    size, _, half = shape
    c = size // 2
    zz = xp.arange(z_lo, z_hi, dtype=xp.int64)[:, None, None]
    yy = xp.arange(-radius, radius + 1, dtype=xp.int64)[None, :, None]
    xx = xp.arange(0, radius + 1, dtype=xp.int64)[None, None, :]
    inside = (zz * zz + yy * yy + xx * xx) <= radius * radius
    z = xp.broadcast_to(zz, inside.shape)[inside]
    y = xp.broadcast_to(yy, inside.shape)[inside]
    x = xp.broadcast_to(xx, inside.shape)[inside]
    flat = ((z + c) * size + (y + c)) * half + x
    return flat, x.astype(xp.float64), y.astype(xp.float64), z.astype(xp.float64)


def _relion_floor(xp, v):
    """RELION's FLOOR macro: (int)v if v is integral or positive, else (int)(v - 1).

    Equal to floor(v) except just above a negative integer, where v - 1 can round down onto
    the next integer (v = -1 + 2^-53 gives -2): RELION then interpolates from the cell below
    with a fraction of 1. Kept for bit-exact agreement.
    """
    t = xp.trunc(v)
    return xp.where((v == t) | (v > 0), t, xp.trunc(v - 1.0))


def _lerp(t, low, high):
    """RELION's LIN_INTERP(a, l, h) = l + (h - l) * a."""
    return low + (high - low) * t


def _sample(xp, data_flat, weight_flat, op, x, y, z, shape, real):
    """Trilinear samples of data and weight at op @ (x, y, z), with Hermitian folding."""
    size, _, half = shape
    c = size // 2
    (m00, m01, m02), (m10, m11, m12), (m20, m21, m22) = op
    px = x * m00 + y * m01 + z * m02  # same association as RELION: (x R00 + y R01) + z R02
    py = x * m10 + y * m11 + z * m12
    pz = x * m20 + y * m21 + z * m22
    neg = px < 0
    sign = xp.where(neg, -1.0, 1.0)
    px *= sign
    py *= sign
    pz *= sign
    x0 = _relion_floor(xp, px)
    y0 = _relion_floor(xp, py)
    z0 = _relion_floor(xp, pz)
    fx = (px - x0).astype(real)
    fy = (py - y0).astype(real)
    fz = (pz - z0).astype(real)
    base = ((z0.astype(xp.int64) + c) * size + (y0.astype(xp.int64) + c)) * half + x0.astype(xp.int64)
    del px, py, pz, x0, y0, z0
    sy, sz = half, size * half

    def trilinear(arr):
        dx00 = _lerp(fx, arr[base], arr[base + 1])
        dx10 = _lerp(fx, arr[base + sy], arr[base + (sy + 1)])
        dxy0 = _lerp(fy, dx00, dx10)
        del dx00, dx10
        dx01 = _lerp(fx, arr[base + sz], arr[base + (sz + 1)])
        dx11 = _lerp(fx, arr[base + (sz + sy)], arr[base + (sz + sy + 1)])
        dxy1 = _lerp(fy, dx01, dx11)
        del dx01, dx11
        return _lerp(fz, dxy0, dxy1)

    d = trilinear(data_flat)
    d = xp.where(neg, xp.conj(d), d)
    w = trilinear(weight_flat)
    return d, w


# ------------------------------------------------------------------------------------------------
# CUDA: the same arithmetic, one thread per voxel of the sphere's bounding box

_CUDA_SOURCE = r"""
__device__ __forceinline__ int relion_floor(double v) {
    const int t = (int)v;                       // RELION's FLOOR macro
    return (v == (double)t || v > 0) ? t : (int)(v - 1.0);
}

template<typename T>
__device__ __forceinline__ T lin(T a, T lo, T hi) { return lo + (hi - lo) * a; }

template<typename T, typename C>
__global__ void symmetrise_kernel(const C* __restrict__ data, const T* __restrict__ weight,
                                  C* __restrict__ out_data, T* __restrict__ out_weight,
                                  const double* __restrict__ mats, const int n_ops,
                                  const int size, const int half, const int radius)
{
    const long long nx = radius + 1, ny = 2LL * radius + 1;
    const long long total = nx * ny * ny;
    const int c = size / 2;
    const long long sy = half, sz = (long long)size * half;
    const double r2max = (double)radius * (double)radius;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const int x = (int)(t % nx);
        const long long rest = t / nx;
        const int y = (int)(rest % ny) - radius;
        const int z = (int)(rest / ny) - radius;
        const double xd = x, yd = y, zd = z;
        if (xd * xd + yd * yd + zd * zd > r2max) continue;
        const long long o = ((long long)(z + c) * size + (y + c)) * half + x;
        C acc = data[o];
        T accw = weight[o];
        for (int op = 0; op < n_ops; ++op) {
            const double* m = mats + 9 * op;
            double px = xd * m[0] + yd * m[1] + zd * m[2];
            double py = xd * m[3] + yd * m[4] + zd * m[5];
            double pz = xd * m[6] + yd * m[7] + zd * m[8];
            const bool neg = px < 0;
            if (neg) { px = -px; py = -py; pz = -pz; }
            const int x0 = relion_floor(px), y0 = relion_floor(py), z0 = relion_floor(pz);
            const T fx = (T)(px - x0), fy = (T)(py - y0), fz = (T)(pz - z0);
            const long long b = ((long long)(z0 + c) * size + (y0 + c)) * half + x0;
            const C d000 = data[b], d001 = data[b + 1], d010 = data[b + sy], d011 = data[b + sy + 1];
            const C d100 = data[b + sz], d101 = data[b + sz + 1];
            const C d110 = data[b + sz + sy], d111 = data[b + sz + sy + 1];
            const T x00r = lin(fx, d000.x, d001.x), x00i = lin(fx, d000.y, d001.y);
            const T x10r = lin(fx, d010.x, d011.x), x10i = lin(fx, d010.y, d011.y);
            const T x01r = lin(fx, d100.x, d101.x), x01i = lin(fx, d100.y, d101.y);
            const T x11r = lin(fx, d110.x, d111.x), x11i = lin(fx, d110.y, d111.y);
            const T y0r = lin(fy, x00r, x10r), y0i = lin(fy, x00i, x10i);
            const T y1r = lin(fy, x01r, x11r), y1i = lin(fy, x01i, x11i);
            const T vr = lin(fz, y0r, y1r), vi = lin(fz, y0i, y1i);
            acc.x += vr;
            acc.y += neg ? -vi : vi;
            const T w00 = lin(fx, weight[b], weight[b + 1]);
            const T w10 = lin(fx, weight[b + sy], weight[b + sy + 1]);
            const T w01 = lin(fx, weight[b + sz], weight[b + sz + 1]);
            const T w11 = lin(fx, weight[b + sz + sy], weight[b + sz + sy + 1]);
            accw += lin(fz, lin(fy, w00, w10), lin(fy, w01, w11));
        }
        out_data[o] = acc;
        out_weight[o] = accw;
    }
}
"""

_NAMES = {np.dtype(np.float32): "symmetrise_kernel<float, float2>",
          np.dtype(np.float64): "symmetrise_kernel<double, double2>"}
_cuda_module = None


def _cuda_kernel(real_dtype):
    global _cuda_module
    if _cuda_module is None:  # --fmad=false: no fused multiply-adds, as in the numpy path
        _cuda_module = cp.RawModule(code=_CUDA_SOURCE, options=("-std=c++17", "--fmad=false"),
                                    name_expressions=tuple(_NAMES.values()))
    return _cuda_module.get_function(_NAMES[np.dtype(real_dtype)])


def _symmetrise_cuda(data_ftc, weight_ftc, operators, radius: int):
    sum_data = cp.ascontiguousarray(data_ftc).copy()
    sum_weight = cp.ascontiguousarray(weight_ftc).copy()
    if not operators:
        return sum_data, sum_weight
    data = cp.ascontiguousarray(data_ftc)
    weight = cp.ascontiguousarray(weight_ftc)
    mats = cp.asarray(np.array(operators, dtype=np.float64).reshape(-1))
    size, half = data.shape[0], data.shape[2]
    total = (radius + 1) * (2 * radius + 1) ** 2
    threads = 256
    blocks = int(min((total + threads - 1) // threads, 65535 * 64))
    _cuda_kernel(weight.dtype)((blocks,), (threads,),
                               (data, weight, sum_data, sum_weight, mats, np.int32(len(operators)),
                                np.int32(size), np.int32(half), np.int32(radius)))
    return sum_data, sum_weight
