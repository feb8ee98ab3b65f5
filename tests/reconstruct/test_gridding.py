"""Known answers of the gridding step: the blob table, the FFT-size option, the floor branch."""

import numpy as np
import pytest

from omlrelion.geometry.grids import fft_friendly_size
from omlrelion.reconstruct.gridding import blob_table, embed_ft, extract_ft, reconstruct_map


def test_blob_table_reference_values():
    # T(rho) = FT(blob)(rho) / FT(blob)(0) for RELION's defaults (radius 2 x 1.9, alpha 15, order 0)
    table = blob_table()
    for rho, value in [(0.1, 0.8466), (0.25, 0.3420), (0.4, 0.0531), (0.49, 0.0089)]:
        assert table[int(rho / 5e-5)] == pytest.approx(value, abs=6e-5)
    assert table[0] == 1.0 and np.all(np.diff(table) < 0)


def test_fft_friendly_size():
    assert fft_friendly_size(515) == 525 and fft_friendly_size(1603) == 1620 and fft_friendly_size(128) == 128


def test_embed_extract_round_trip(rng):
    a = rng.normal(size=(13, 13, 7)) + 1j * rng.normal(size=(13, 13, 7))
    big = embed_ft(a, 18)
    assert big.shape == (18, 18, 10)
    np.testing.assert_array_equal(extract_ft(big, 13), a)
    assert np.abs(big).sum() == pytest.approx(np.abs(a).sum())


def test_gridding_on_a_friendlier_fft_size_stays_close(padded_sums):
    """Same kernel function on a larger FFT grid: not bit-equal (the truncated blob is sampled
    differently): 4e-4 relative on RELION's own box-64 sums, 1.8e-3 on these random box-32 sums."""
    grid, data, weight = padded_sums(32, n_images=400)
    ref = reconstruct_map(data, weight, box_size=32)
    for n in (fft_friendly_size(grid.size), 80):
        ours = reconstruct_map(data, weight, box_size=32, fft_size=n)
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 5e-3   # 1.8e-3 seen; 0.15 if the blob is not rescaled
    with pytest.raises(ValueError, match="smaller"):
        reconstruct_map(data, weight, box_size=32, fft_size=grid.size - 2)


@pytest.mark.parametrize("in_float64", [True, False])
def test_float32_sums_with_a_map_term_give_the_float64_map(map_term_sums, monkeypatch, in_float64):
    """A MAP term 1/tau2 far above the low shells' weights (tau2 falling to 1e-8 beyond the
    resolution, as in a refinement) is rounded into the low shells by float32 gridding FFTs: the
    loop runs in float64 and the map of float32 sums is the float64 one to float32 precision. The
    float32 loop (in_float64 False) shows what that avoids."""
    from omlrelion.reconstruct import gridding

    if not in_float64:
        monkeypatch.setattr(gridding, "map_term_in_float64", lambda *a: False)
    grid, data, weight, tau2 = map_term_sums
    kw = dict(box_size=grid.box_size, r_max=grid.r_max, tau2=tau2, minres_map=5)
    ref = reconstruct_map(data, weight, **kw)
    single = reconstruct_map(data.astype(np.complex64), weight.astype(np.float32), **kw)
    err = np.linalg.norm(single - ref) / np.linalg.norm(ref)
    assert (err < 1e-5) if in_float64 else (err > 1e-4)
