"""The sums-to-map planner: candidates, memory model vs tracemalloc, refusals, choices, calibration cache."""

import json
import tracemalloc

import numpy as np
import pytest

from omlrelion.backend import Device
from omlrelion.errors import InputError
from omlrelion.geometry.grids import PaddedGrid, fft_friendly_size
from omlrelion.reconstruct import autotune, calibration
from omlrelion.reconstruct.autotune import (
    Plan,
    calibrate,
    calibration_path,
    choose_plan,
    enumerate_candidates,
    fft_pair_seconds,
    get_calibration,
    inexact_sizes,
    load_calibration,
    measure_plan,
    memory_estimate,
    memory_per_device,
    plan_for,
    predict_seconds,
    save_calibration,
)
from omlrelion.reconstruct.gridding import reconstruct_map


def _calibration(**over):
    """A hand-made calibration (seconds and bandwidths of a hypothetical device), for ranking tests."""
    cal = {"format": 1, "device_model": "test", "backend": "cupy", "memory_factor": 1.0,
           "fft_pair_s": {"3d": {}, "columns": {}}, "fft_work_bytes": {"3d": {}, "columns": {}},
           "fft_fit": {"3d": {"a": 1e-11, "b": 1.0}, "columns": {"a": 1.2e-11, "b": 1.0}},
           "memory_bandwidth_Bps": 2e12, "host_memory_bandwidth_Bps": 2e10,
           "copy_bandwidth_Bps": {"local": 1e12, "peer": 2e11, "to_host": 2e10}}
    cal.update(over)
    return cal


@pytest.fixture(autouse=True)
def _fresh_decisions():
    autotune.clear_plan_cache()
    yield
    autotune.clear_plan_cache()


def test_plan_describe_and_json_round_trip():
    plan = Plan(2, "packed", True, 515, stage_data=True)
    assert plan.describe() == "2 devices, packed, strided, fft 515, data staged on host"
    assert Plan(1, "dense", False, 525).describe() == "1 device, dense, fft 525"
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.raises(ValueError, match="storage"):
        Plan(1, "sparse", False, 515)
    with pytest.raises(ValueError, match="one device"):
        Plan(2, "dense", False, 515)


def test_candidates_enumerate_as_specified():
    grid = PaddedGrid(256, 2.0, 128)                   # P = 515 = 5 * 103
    exact = enumerate_candidates(grid, 3)
    assert all(p.fft_size == 515 for p in exact)
    assert {(p.n_devices, p.storage, p.strided, p.stage_data) for p in exact} == {
        (1, "dense", False, False), (1, "packed", False, False), (1, "packed", False, True),
        *((g, "packed", t, h) for g in (2, 3) for t in (False, True) for h in (False, True))}
    assert len(exact) == 11
    sizes = inexact_sizes(grid)
    assert sizes[0] == fft_friendly_size(516) == 525 and all(515 < n <= 1.15 * 515 for n in sizes)
    inexact = [p for p in enumerate_candidates(grid, 3, allow_inexact=True) if p.fft_size != 515]
    assert len(inexact) == 11 * len(sizes)
    assert sorted({p.fft_size for p in inexact}) == sizes
    compact = enumerate_candidates(grid, 2, kernel="compact")
    assert all(p.kernel == "compact" and p.storage == "packed" and p.is_exact(grid) for p in compact)
    direct = [p for p in compact if p.convolution == "direct"]
    assert len(direct) == 2 and all(p.n_devices == 1 for p in direct)
    assert {p.fft_size for p in compact} == {515, *sizes}


def _sums(rng, grid, dtype):
    cplx = np.result_type(dtype, np.complex64)
    data = (rng.normal(size=grid.shape) + 1j * rng.normal(size=grid.shape)).astype(cplx)
    return data, rng.uniform(0.1, 1.0, size=grid.shape).astype(dtype)


def _traced_peak(fn):
    fn()                                                    # imports, FFT plans, caches
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


# the single-device replay; model / traced peak (NumPy arrays, inputs included) asserted within 5%
# (the packed engine's closed-form model is checked in test_columns)
@pytest.mark.parametrize("box, r_max, n_devices, storage, strided, dtype, n_iter, fft_size, tau2", [
    (32, 16, 1, "dense", False, np.float64, 2, None, False),     # single-device path
    (32, 16, 1, "dense", False, np.float32, 2, 70, False),       # single-device path, inexact FFT side
    (32, 16, 1, "dense", False, np.float64, 2, None, True),      # MAP term
    (40, 12, 1, "dense", False, np.float64, 2, None, False),     # maxres: Q > P
    (48, 24, 1, "dense", False, np.float32, 0, None, True),      # the MAP term sets the peak
    (32, 16, 1, "dense", False, np.float32, 2, None, True),      # MAP term: the loop in float64
])
def test_memory_model_matches_tracemalloc(rng, box, r_max, n_devices, storage, strided, dtype, n_iter, fft_size,
                                          tau2):
    grid = PaddedGrid(box, 2.0, r_max)
    data, weight = _sums(rng, grid, dtype)
    tau2 = np.linspace(2.0, 0.0, r_max + 1) ** 2 if tau2 else None
    kwargs = {"box_size": box, "r_max": r_max, "n_iter": n_iter, "skip_gridding": n_iter == 0, "tau2": tau2}
    plan = Plan(n_devices, storage, strided, fft_size or grid.size)

    def run():
        reconstruct_map(data, weight, fft_size=fft_size, **kwargs)
    measured = data.nbytes + weight.nbytes + _traced_peak(run)
    est = memory_estimate(plan, grid, dtype, backend="numpy", library_buffers=False, n_iter=n_iter,
                          map_term=tau2 is not None)
    assert est.simulated_total == pytest.approx(measured, rel=0.05)           # brief: +-25%
    assert max(est.per_device) <= est.simulated_total
    # the same run with pocketfft's buffers counted can only need more
    assert memory_per_device(plan, grid, dtype, backend="numpy", n_iter=n_iter,
                             map_term=tau2 is not None) >= est.max_per_device


def test_memory_per_device_with_devices_and_packing():
    grid = PaddedGrid(320, 2.0, 160)
    P = grid.size
    one = memory_estimate(Plan(1, "dense", False, P), grid)            # CuPy: fused single-device loop
    one_packed = memory_estimate(Plan(1, "packed", False, P), grid)
    staged = memory_estimate(Plan(1, "packed", False, P, stage_data=True), grid)
    two_packed = memory_estimate(Plan(2, "packed", False, P), grid)
    four_packed = memory_estimate(Plan(4, "packed", True, P), grid)
    assert one_packed.max_per_device < 0.6 * one.max_per_device
    assert staged.max_per_device < one_packed.max_per_device and staged.host > one_packed.host
    assert two_packed.per_device[0] > two_packed.per_device[1]     # the input device packs the dense sums
    assert max(two_packed.per_device[1:]) < 0.6 * one_packed.max_per_device
    assert max(four_packed.per_device[1:]) < 0.6 * max(two_packed.per_device[1:])


def test_refuses_an_impossible_budget_with_needed_and_free_bytes():
    grid = PaddedGrid(64, 2.0, 32)
    with pytest.raises(InputError) as info:
        choose_plan(grid, [Device()] * 2, free_bytes=1000, calibration=_calibration())
    message = str(info.value)
    assert "\n" not in message and "1000 bytes" in message and "are free" in message
    smallest = min(memory_per_device(p, grid, np.float64, backend="numpy")
                   for p in enumerate_candidates(grid, 2))
    assert f"needs {smallest} bytes" in message and "per device" in message


def _table_memory(grid, devices, **kw):
    _, table = choose_plan(grid, devices, free_bytes=10**15, calibration=_calibration(), **kw)
    return {row["description"]: row["memory_per_device_bytes"] for row in table}


def test_prefers_packed_when_dense_does_not_fit():
    grid = PaddedGrid(64, 2.0, 32)
    memory = _table_memory(grid, [Device()] * 2)
    dense = memory["1 device, dense, fft 131"]
    packed = memory["1 device, packed, fft 131"]
    assert packed < dense
    fits_packed_only = (packed + dense) // 2
    assert all(v > fits_packed_only for k, v in memory.items() if "packed" not in k)
    plan, table = choose_plan(grid, [Device()] * 2, free_bytes=fits_packed_only, calibration=_calibration())
    assert plan.storage == "packed"
    assert [row["fits"] for row in table] == sorted((row["fits"] for row in table), reverse=True)


def test_prefers_more_devices_when_one_does_not_fit():
    grid = PaddedGrid(64, 2.0, 32)
    memory = _table_memory(grid, [Device()] * 3)
    one = min(v for k, v in memory.items() if k.startswith("1 device"))
    three = min(v for k, v in memory.items() if k.startswith("3 devices"))
    assert three < one
    plan, _ = choose_plan(grid, [Device()] * 3, free_bytes=(three + one) // 2, calibration=_calibration())
    assert plan.n_devices > 1
    plan, _ = choose_plan(grid, [Device()] * 3, free_bytes=10**15, calibration=_calibration())
    assert plan.n_devices == 3                              # the hand-made GPU model scales with devices


def test_measure_picks_the_measured_fastest():
    grid = PaddedGrid(64, 2.0, 32)
    cal = _calibration()
    calls = []
    measured = {Plan(1, "dense", False, 131): 5.0, Plan(1, "dense", False, 135): 3.0}

    def seconds(plan):
        return measured.get(plan, 1.0 + plan.n_devices + (plan.storage == "packed"))

    def timer(plan):
        calls.append(plan)
        return seconds(plan)

    plan, table = choose_plan(grid, [Device()] * 2, free_bytes=10**15, calibration=cal, allow_inexact=True,
                              measure=3, timer=timer)
    predicted = sorted(table, key=lambda row: row["predicted_s"])
    assert [Plan.from_dict(row["plan"]) for row in predicted[:3]] == calls
    timed = [row for row in table if row["measured_s"] is not None]
    assert len(timed) == 3 and table[0]["chosen"] and sum(row["chosen"] for row in table) == 1
    assert table[0]["measured_s"] == min(row["measured_s"] for row in timed)
    assert plan == Plan.from_dict(table[0]["plan"]) == min(calls, key=seconds)


def test_decisions_are_cached_per_grid_and_replanned_when_r_max_changes(monkeypatch):
    cal = _calibration()
    count = []
    original = autotune.memory_estimate
    monkeypatch.setattr(autotune, "memory_estimate", lambda *a, **k: count.append(1) or original(*a, **k))
    devices = [Device()] * 2
    first = choose_plan(PaddedGrid(64, 2.0, 20), devices, free_bytes=10**12, calibration=cal)
    n = len(count)
    assert choose_plan(PaddedGrid(64, 2.0, 20), devices, free_bytes=10**12, calibration=cal) == first
    assert len(count) == n                                  # cached: nothing recomputed
    choose_plan(PaddedGrid(64, 2.0, 24), devices, free_bytes=10**12, calibration=cal)
    assert len(count) > n                                   # r_max changed: planned again


def test_cost_model_prefers_smooth_fft_sides_and_counts_iterations():
    grid = PaddedGrid(256, 2.0, 128)
    cal = _calibration()
    exact = predict_seconds(Plan(1, "dense", False, 515), grid, cal)
    friendly = predict_seconds(Plan(1, "dense", False, 525), grid, cal)
    assert friendly < exact
    assert predict_seconds(Plan(1, "dense", False, 515), grid, cal, n_iter=20) > exact
    measured = _calibration(fft_pair_s={"3d": {"515": 0.5}, "columns": {}})
    assert fft_pair_seconds(measured, "3d", 515) == 0.5
    assert fft_pair_seconds(cal, "3d", 525) == pytest.approx(1e-11 * 525**3 * np.log2(525.0**3))


def test_calibration_measures_fits_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path))
    devices = [Device()] * 2
    record = calibrate(devices, [20, 23], repeats=1, probe_bytes=1 << 20)
    for kind in ("3d", "columns"):
        assert {"20", "23"} <= set(record["fft_pair_s"][kind])
        assert record["fft_fit"][kind]["a"] > 0 and record["fft_fit"][kind]["b"] >= 0
        assert fft_pair_seconds(record, kind, 40) > 0          # extrapolated
    assert record["backend"] == "numpy" and record["memory_factor"] == 1.0
    path = calibration_path(Device())
    assert path.parent == tmp_path and path.name.startswith("autotune-cpu")
    save_calibration(record, path)
    assert load_calibration(path) == json.loads(json.dumps(record))
    # reused when present: no measurement
    monkeypatch.setattr(calibration, "_time_pair", lambda *a, **k: pytest.fail("measured although cached"))
    assert get_calibration(devices, [20, 23]) == load_calibration(path)
    # re-measured with recalibrate, and saved
    monkeypatch.setattr(calibration, "_time_pair", lambda *a, **k: (0.25, 0))
    again = get_calibration(devices, [20, 23], recalibrate=True, repeats=1, probe_bytes=1 << 20)
    assert set(again["fft_pair_s"]["3d"].values()) == {0.25}
    assert load_calibration(path)["fft_pair_s"] == again["fft_pair_s"]


def test_measure_plan_runs_the_real_code():
    grid = PaddedGrid(16, 2.0, 8)
    ticks = iter(range(1000))
    seconds = measure_plan(Plan(2, "packed", True, grid.size), grid, [Device()] * 2, n_iter=10,
                           clock=lambda: float(next(ticks)))
    # every timed run takes one tick on this clock: t1 = t3 = 1, so t_iter = 0 and the step costs 1
    assert seconds == 1.0


def test_plan_for_auto_and_explicit():
    grid = PaddedGrid(32, 2.0, 16)
    cal_devices = [Device()] * 2
    assert plan_for(grid, cal_devices, "packed", strided=True) == Plan(2, "packed", True, grid.size)
    assert plan_for(grid, [Device()], "packed", strided=True) == Plan(1, "packed", False, grid.size)
    with pytest.raises(InputError, match="one device"):
        plan_for(grid, cal_devices, "dense")
    with pytest.raises(InputError, match="expected auto, dense or packed"):
        plan_for(grid, cal_devices, "sparse")
