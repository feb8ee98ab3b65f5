"""The functions behind the workflow's rules, on small simulated data (no Snakemake)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="pip install -e \".[workflow]\"")

from omlrelion.errors import InputError
from omlrelion.geometry.grids import PaddedGrid
from omlrelion.io import h5
from omlrelion.io.star import read_particles, read_star_table, write_star
from omlrelion.pipeline import workflow as wf
from omlrelion.pipeline.simulate import SimulateParams, simulate
from omlrelion.reconstruct.fsc import fsc

PRE = {"box_size": None, "normalise": True, "bg_radius_px": None, "remove_ramp": True, "invert_contrast": False,
       "n_shards": 2, "seed": 0, "compression": {"codec": "zstd", "level": 5, "shuffle": "byte"}}
COMPRESSION = {"codec": "zstd", "level": 5, "shuffle": "byte"}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sim")
    simulate("phantom", folder / "particles", SimulateParams(n_particles=120, box_size=24, angpix=3.0, snr=1.0,
                                                             shift_max_px=1.0), seed=5)
    return folder / "particles.star"


def test_preprocess_store(sim, tmp_path):
    wf.preprocess(sim, tmp_path / "p.h5", opts={**PRE, "box_size": 16, "invert_contrast": True, "n_shards": 3})
    particles = read_particles(sim)
    with h5.ParticleStore(tmp_path / "p.h5") as store:
        assert (store.n_particles, store.box_size, store.angpix) == (120, 16, 4.5)
        images = store.read_images(np.arange(120))
        half, shard = store.column("half"), store.column("shard")
        np.testing.assert_array_equal(half, particles.random_subset)  # the STAR file's halves are kept
        for h in (1, 2):
            assert sorted(np.bincount(shard[half == h])[1:]) == [20, 20, 20]
        np.testing.assert_allclose(store.column("shifts_px"), particles.shifts_px * 16 / 24)
        np.testing.assert_array_equal(store.column("eulers_deg"), particles.eulers_deg)
    y, x = np.mgrid[:16, :16] - 8
    bg = images[:, x * x + y * y > 6**2]
    np.testing.assert_allclose(bg.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(bg.std(axis=1), 1, atol=1e-4)


def test_fourier_crop_keeps_centre_and_mean(rng):
    y, x = np.mgrid[:32, :32] - 16
    image = np.exp(-(x * x + y * y) / 20.0)[None].astype(np.float32)
    small = wf._fourier_crop(image, 16)
    assert small.shape == (1, 16, 16)
    assert np.unravel_index(np.argmax(small[0]), (16, 16)) == (8, 8)
    assert small.mean() == pytest.approx(image.mean(), rel=1e-5)


def test_random_halves_when_absent_and_mixed_subsets_refused(sim, tmp_path):
    particles = read_particles(sim)
    optics, table = particles.optics_table, particles.table.drop(columns=["rlnRandomSubset"])
    write_star(tmp_path / "nohalves.star", {"optics": optics, "particles": table})
    (tmp_path / "particles.mrcs").symlink_to(sim.with_suffix(".mrcs"))
    wf.preprocess(tmp_path / "nohalves.star", tmp_path / "p.h5", opts=PRE)
    with h5.ParticleStore(tmp_path / "p.h5") as store:
        counts = np.bincount(store.column("half"))[1:]
    assert counts.sum() == 120 and min(counts) > 40
    table["rlnRandomSubset"] = [1] * 60 + [0] * 60
    write_star(tmp_path / "mixed.star", {"optics": optics, "particles": table})
    with pytest.raises(InputError, match="mixed.star.*some particles only"):
        wf.preprocess(tmp_path / "mixed.star", tmp_path / "q.h5", opts=PRE)


def test_input_checks_name_key_and_file(sim, tmp_path):
    assert wf.check_particles(sim, n_shards=2, ctf=True) == 120
    with pytest.raises(InputError, match="preprocess.n_shards = 61 .*60"):
        wf.check_particles(sim, n_shards=61, ctf=True)
    with pytest.raises(InputError, match="preprocess.box_size = 32 "):
        wf.check_particles(sim, n_shards=2, ctf=True, box_size=32)
    particles = read_particles(sim)
    optics, table = particles.optics_table, particles.table
    table.loc[5, "rlnImageName"] = "000500@particles.mrcs"
    (tmp_path / "particles.mrcs").symlink_to(sim.with_suffix(".mrcs"))
    write_star(tmp_path / "bad.star", {"optics": optics, "particles": table})
    with pytest.raises(InputError, match=r"bad.star: image 500@.*out of range"):
        wf.check_particles(tmp_path / "bad.star", n_shards=2, ctf=True)
    table.loc[5, "rlnImageName"] = "000001@missing.mrcs"
    write_star(tmp_path / "bad2.star", {"optics": optics, "particles": table})
    with pytest.raises(InputError, match="bad2.star: row 6: image stack 'missing.mrcs' not found"):
        wf.check_particles(tmp_path / "bad2.star", n_shards=2, ctf=True)
    with pytest.raises(InputError, match="preprocess.n_shards = 400 .*dataset demo"):
        wf.check_shards(400, 600, "dataset demo")


def _iteration(store, folder, it, opts, model_in=None, reference=None, sampling_in=None):
    for half in (1, 2):
        shards = []
        for shard in (1, 2):
            kw = {}
            if it > 1:
                kw = {"poses_in": folder / f"it{it - 1}_poses_{half}_{shard}.h5", "model_in": model_in,
                      "reference": reference[half], "sampling_in": sampling_in}
            wf.expectation_shard(store, folder / f"it{it}_sums_{half}_{shard}.h5", folder / f"it{it}_poses_{half}_{shard}.h5",
                                 half=half, shard=shard, iteration=it, opts=opts, **kw)
            shards.append(folder / f"it{it}_sums_{half}_{shard}.h5")
        wf.merge_sums(shards, folder / f"it{it}_sums_{half}.h5", half=half, iteration=it,
                      opts={"symmetry": "C1", "compression": COMPRESSION})


def test_two_iterations_schedule_scores_and_fsc(sim, tmp_path):
    store = tmp_path / "p.h5"
    wf.preprocess(sim, store, opts=PRE)
    schedule = {"iterations": 2, "until_converged": False, "max_iterations": 9, "initial_resolution_A": 20.0,
                "incr_size": 4}
    opts = {"pad": 2.0, "maxres_A": None, "ctf": True, "precision": "single", "compression": COMPRESSION,
            "first": wf.first_iteration(schedule)}
    _iteration(store, tmp_path, 1, opts)
    m1 = wf.model_update(tmp_path / "it1_sums_1.h5", tmp_path / "it1_sums_2.h5", tmp_path / "m1.json", iteration=1,
                         opts={"maxres_A": None, "tau2_fudge": 1.0, **wf.iteration_schedule(schedule, 1)})
    assert m1["r_max"] == 4 and not m1["final"] and m1["next_is_final"] and m1["next_r_max"] == 12
    assert all(v == 0 for v in m1["fsc"][5:])  # nothing back-projected beyond r_max
    rec = {"tau2_fudge": 1.0, "gridding_iterations": 0, "compression": COMPRESSION}
    refs = {}
    for half in (1, 2):
        refs[half] = tmp_path / f"half{half}.h5"
        wf.reconstruct_half(tmp_path / f"it1_sums_{half}.h5", tmp_path / "m1.json", refs[half],
                            tmp_path / f"run_it001_half{half}_class001.mrc", tmp_path / f"h{half}_model.star",
                            half=half, iteration=1, opts=rec)
    # refine.flatten_solvent: the same map times a soft sphere of the particle diameter (24 px - 5 here)
    flat = {**rec, "flatten_solvent": {"particle_diameter_A": None}}
    wf.reconstruct_half(tmp_path / "it1_sums_1.h5", tmp_path / "m1.json", tmp_path / "flat.h5", tmp_path / "flat.mrc",
                        tmp_path / "flat_model.star", half=1, iteration=1, opts=flat)
    plain, flattened = h5.read_volume(refs[1])[0], h5.read_volume(tmp_path / "flat.h5")[0]
    z, y, x = np.mgrid[:24, :24, :24] - 12
    r = np.sqrt(x * x + y * y + z * z)
    assert np.allclose(flattened[r <= 9.5], plain[r <= 9.5]) and not flattened[r >= 14.5].any()
    assert np.abs(plain[r >= 14.5]).max() > 0
    opts.pop("first")
    _iteration(store, tmp_path, 2, opts, model_in=tmp_path / "m1.json", reference=refs)
    poses, attrs = h5.read_table(tmp_path / "it2_poses_1_1.h5")
    assert attrs["iteration"] == 2 and np.isfinite(poses["score"]).all() and poses["score"].mean() > 0.05
    first, _ = h5.read_table(tmp_path / "it1_poses_1_1.h5")
    np.testing.assert_array_equal(first["eulers_deg"], poses["eulers_deg"])  # poses kept: no pose search
    assert np.isnan(first["score"]).all()
    m2 = wf.model_update(tmp_path / "it2_sums_1.h5", tmp_path / "it2_sums_2.h5", tmp_path / "m2.json", iteration=2,
                         opts={"maxres_A": None, "tau2_fudge": 1.0, **wf.iteration_schedule(schedule, 2)},
                         prev_model=tmp_path / "m1.json")
    assert m2["final"] and m2["r_max"] == 12 and m2["next_r_max"] is None
    assert json.loads((tmp_path / "m2.json").read_text())["resolution_0143_A"] < m1["resolution_0143_A"] + 1e-9

    table = read_star_table(tmp_path / "h1_model.star", block="model_class_1")
    assert len(table) == 13 and (table["rlnReferenceTau2"].to_numpy()[:5] > 0).all()


def test_fsc_from_sums_known_answers(rng):
    grid = PaddedGrid(16, 2.0, 6)
    data = (rng.standard_normal(grid.shape) + 1j * rng.standard_normal(grid.shape)).astype(np.complex64)
    weight = rng.random(grid.shape).astype(np.float32) + 0.5
    same = wf.fsc_from_sums(data, weight, data.copy(), weight.copy(), grid=grid)
    np.testing.assert_allclose(same[:7], 1.0, atol=1e-12)
    assert (same[7:] == 0).all() and len(same) == 9
    other = (rng.standard_normal(grid.shape) + 1j * rng.standard_normal(grid.shape)).astype(np.complex64)
    noise = wf.fsc_from_sums(data, weight, other, weight, grid=grid)
    assert noise[0] == 1.0 and np.abs(noise[2:7]).max() < 0.35


def test_resolution_shell_rules():
    curve = np.array([1, 1, 0.9, 0.8, 0.7, 0.6, 0.55, 0.52, 0.3, 0.1, 0, 0, 0, 0])
    assert wf.resolution_shell(curve) == 7
    assert wf.resolution_shell(np.array([1, 0.9, 0.2, 0, 0, 0, 0, 0])) == wf.MINRES_MAP  # floored
    dip = curve.copy()
    dip[12] = 0.8  # SSNR > 1 again further than r* + 3: RELION jumps there
    assert wf.resolution_shell(dip) == 12


def test_schedule_parameters():
    fixed = {"iterations": 3, "until_converged": False, "max_iterations": 9, "initial_resolution_A": 10.0, "incr_size": 5}
    assert wf.first_iteration(fixed) == {"initial_resolution_A": 10.0, "final": False}
    assert wf.first_iteration({**fixed, "iterations": 1})["final"]
    assert wf.iteration_schedule(fixed, 2) == {"mode": "fixed", "next_is_final": True}
    assert wf.iteration_schedule(fixed, 1)["first_is_final"] is False
    conv = {**fixed, "until_converged": True, "max_iterations": 4}
    assert wf.iteration_schedule(conv, 3) == {"mode": "converge", "last_allowed": True}


def test_postprocess_on_noisy_halves(tmp_path, rng):
    from omlrelion.io.mrc import write_map
    from omlrelion.pipeline.phantom import phantom_volume

    truth = phantom_volume(32, 3.0, 1)
    for h in (1, 2):
        write_map(tmp_path / f"h{h}.mrc", truth + 0.05 * rng.standard_normal(truth.shape).astype(np.float32), 3.0)
    outputs = {k: tmp_path / f"{k}.{ext}" for k, ext in (("map", "mrc"), ("masked_map", "mrc"), ("star", "star"),
                                                          ("json", "json"), ("fsc_png", "png"), ("guinier_png", "png"),
                                                          ("slices_png", "png"))}
    opts = {"mask_diameter_A": None, "mask_edge_px": 4, "randomise_at_fsc": 0.8, "bfactor": None, "fit_low_A": 30.0,
            "seed": 0}
    out = wf.postprocess(tmp_path / "h1.mrc", tmp_path / "h2.mrc", outputs, opts=opts)
    curve = fsc(truth.astype(np.float64), truth + 0.05 * rng.standard_normal(truth.shape))
    assert 6.0 <= out["resolution_A"] <= 12.0 and out["bfactor"] < 0
    assert np.isfinite(curve).all() and all(p.is_file() for p in outputs.values())


def test_reconstruction_jobs_on_several_devices_give_the_one_device_maps(sim, tmp_path, monkeypatch):
    """resources gpu: N > 1 on a machine without GPUs runs the multi-device (packed, by columns)
    sums-to-map step on N simulated devices: the same half, unfiltered and joined maps."""
    from omlrelion.backend import Device
    from omlrelion.io.mrc import read_map

    monkeypatch.setattr(wf, "gpu_count", lambda: 0)
    assert wf.job_devices(0) == [Device()] and wf.job_devices(1) == [Device()]
    assert wf.job_devices(3) == [Device()] * 3
    store = tmp_path / "p.h5"
    wf.preprocess(sim, store, opts=PRE)
    schedule = {"iterations": 1, "until_converged": False, "max_iterations": 9, "initial_resolution_A": 20.0,
                "incr_size": 4}
    opts = {"pad": 2.0, "maxres_A": None, "ctf": True, "precision": "double", "compression": COMPRESSION,
            "first": wf.first_iteration(schedule)}
    _iteration(store, tmp_path, 1, opts)
    wf.model_update(tmp_path / "it1_sums_1.h5", tmp_path / "it1_sums_2.h5", tmp_path / "m1.json", iteration=1,
                    opts={"maxres_A": None, "tau2_fudge": 1.0, **wf.iteration_schedule(schedule, 1)})
    rec = {"tau2_fudge": 1.0, "gridding_iterations": 10, "compression": COMPRESSION}
    maps = {}
    for n in (1, 3):
        devices = wf.job_devices(n)
        wf.reconstruct_half(tmp_path / "it1_sums_1.h5", tmp_path / "m1.json", tmp_path / f"half_{n}.h5",
                            tmp_path / f"half_{n}.mrc", tmp_path / f"half_{n}_model.star", half=1, iteration=1,
                            opts=rec, devices=devices)
        wf.reconstruct_unfil(tmp_path / "it1_sums_2.h5", tmp_path / "m1.json", tmp_path / f"unfil_{n}.mrc", half=2,
                             iteration=1, opts=rec, devices=devices)
        wf.reconstruct_joined(tmp_path / "it1_sums_1.h5", tmp_path / "it1_sums_2.h5", tmp_path / "m1.json",
                              tmp_path / f"joined_{n}.mrc", tmp_path / f"joined_{n}_model.star", iteration=1, opts=rec,
                              devices=devices)
        maps[n] = [read_map(tmp_path / f"{kind}_{n}.mrc")[0].astype(np.float64) for kind in ("half", "unfil", "joined")]
    for one, three in zip(maps[1], maps[3]):
        assert np.linalg.norm(three - one) / np.linalg.norm(one) < 1e-5      # float32 files of float64 maps


SEARCH = {"pose_search_order": 1, "offset_range_px": 1.0, "offset_step_px": 1.0, "auto_local_order": 2,
          "max_healpix_order": 3, "sampling_schedule": True, "oversampling": 1, "particle_diameter_A": None,
          "sigma_offset_A": 10.0, "zero_mask": True, "perturb": 0.5, "seed": 0}


def _search_iteration_1(sim, tmp_path):
    """A pose-search run of 3 iterations up to iteration 1's model_update (input poses kept):
    (store, search options, expectation options, model options of an iteration, model.json of 1)."""
    store = tmp_path / "p.h5"
    wf.preprocess(sim, store, opts=PRE)
    schedule = {"iterations": 3, "until_converged": False, "max_iterations": 9, "initial_resolution_A": 20.0,
                "incr_size": 4}
    search = {"search": SEARCH, "symmetry": "C1"}
    opts = {"pad": 2.0, "maxres_A": None, "ctf": True, "precision": "double", "compression": COMPRESSION, **search,
            "first": wf.first_iteration(schedule)}

    def model_opts(it):
        return {"maxres_A": None, "tau2_fudge": 1.0, **wf.iteration_schedule(schedule, it), **search}

    _iteration(store, tmp_path, 1, opts)
    m1 = wf.model_update(tmp_path / "it1_sums_1.h5", tmp_path / "it1_sums_2.h5", tmp_path / "m1.json", iteration=1,
                         opts=model_opts(1), store=store)
    return store, search, opts, model_opts, m1


@pytest.mark.gpu
def test_pose_search_shard_on_a_gpu_matches_the_cpu(sim, tmp_path):
    """An expectation job of a pose search on GPU 0 (float32) against the same job on the host
    (float64): the same poses for nearly every particle, the same sums to float32 precision."""
    from omlrelion.backend import Device

    store, search, opts, _, _ = _search_iteration_1(sim, tmp_path)
    rec = {"tau2_fudge": 1.0, "gridding_iterations": 0, "compression": COMPRESSION}
    wf.reconstruct_half(tmp_path / "it1_sums_1.h5", tmp_path / "m1.json", tmp_path / "half1.h5", tmp_path / "h1.mrc",
                        tmp_path / "h1_model.star", half=1, iteration=1, opts=rec)
    wf.next_sampling(store, tmp_path / "m1.json", tmp_path / "half1.h5",
                     [tmp_path / "it1_poses_1_1.h5", tmp_path / "it1_poses_1_2.h5"], tmp_path / "s1.json",
                     iteration=1, opts={"pad": 2.0, "ctf": True, **search})
    opts.pop("first")
    kw = {"poses_in": tmp_path / "it1_poses_1_1.h5", "model_in": tmp_path / "m1.json",
          "reference": tmp_path / "half1.h5", "sampling_in": tmp_path / "s1.json"}
    out = {}
    for name, device in (("cpu", Device()), ("gpu", Device(0))):
        wf.expectation_shard(store, tmp_path / f"{name}_sums.h5", tmp_path / f"{name}_poses.h5", half=1, shard=1,
                             iteration=2, opts=opts, device=device, **kw)
        out[name] = (h5.read_table(tmp_path / f"{name}_poses.h5")[0], h5.read_sums(tmp_path / f"{name}_sums.h5")[:2])
    (cpu, (d_cpu, w_cpu)), (gpu, (d_gpu, w_gpu)) = out["cpu"], out["gpu"]
    same = np.all(np.isclose(cpu["eulers_deg"], gpu["eulers_deg"]), axis=1).mean()
    assert same > 0.9
    np.testing.assert_allclose(gpu["score"], cpu["score"], atol=0.05)
    assert np.linalg.norm(d_gpu - d_cpu) < 0.05 * np.linalg.norm(d_cpu)
    assert np.linalg.norm(w_gpu - w_cpu) < 0.05 * np.linalg.norm(w_cpu)


def test_sharded_pose_search_is_the_engines_e_step_of_the_half(sim, tmp_path):
    """With a pose search from the input poses, model_update of iteration 1 starts each half's noise
    spectrum as the engine does (`initial_sigma2` of its first images, masked), and iteration 2's
    shard jobs together make the refinement engine's E-step of the whole half set (`expect_particles`):
    the same poses and, added up, the same Fourier and noise sums. The model then holds the engine's
    M-step updates (sigma2, sigma_offset); the sampling job estimates the accuracy and moves the
    perturbation on."""
    from omlrelion.fourier.layout import rfft2_centred
    from omlrelion.refine.autorefine import circular_mask, direction_distribution, expect_particles, initial_sigma2
    from omlrelion.refine.maximization import update_sigma2, update_sigma_offset
    from omlrelion.refine.schedule import Schedule

    store, search, opts, model_opts, m1 = _search_iteration_1(sim, tmp_path)
    columns = ("half", "eulers_deg", "shifts_px", "optics_group", "defocus_u", "defocus_v", "defocus_angle_deg",
               "phase_shift_deg", "ctf_bfactor", "ctf_scale")
    with h5.ParticleStore(store) as st:
        col = {c: st.column(c) for c in columns}
        n, optics = st.box_size, st.optics[0]
        images = st.read_images(np.arange(st.n_particles))
        ctf = wf._ctf_params(st, np.arange(st.n_particles), col)
    mask = circular_mask(n, (n - 5) / 2, np)
    for h in (1, 2):
        expected = initial_sigma2(rfft2_centred(images[col["half"] == h].astype(np.float64) * mask))
        np.testing.assert_allclose(m1["search"]["sigma2"][h - 1], expected, rtol=1e-9)
    assert m1["search"]["schedule"]["order"] == 1 and not m1["search"]["converged"]
    rec = {"tau2_fudge": 1.0, "gridding_iterations": 0, "compression": COMPRESSION}
    refs = {h: tmp_path / f"half{h}.h5" for h in (1, 2)}
    for h in (1, 2):
        wf.reconstruct_half(tmp_path / f"it1_sums_{h}.h5", tmp_path / "m1.json", refs[h], tmp_path / f"h{h}.mrc",
                            tmp_path / f"h{h}_model.star", half=h, iteration=1, opts=rec)
    sampling_opts = {"pad": 2.0, "ctf": True, **search}
    s1 = wf.next_sampling(store, tmp_path / "m1.json", refs[1], [tmp_path / "it1_poses_1_1.h5", tmp_path / "it1_poses_1_2.h5"],
                          tmp_path / "s1.json", iteration=1, opts=sampling_opts)
    assert s1["iteration"] == 2 and s1["schedule"]["order"] == 1 and 0 < s1["schedule"]["acc_rot_deg"] <= 30
    assert 0.25 <= abs(s1["perturb"]) <= 0.5
    opts.pop("first")
    _iteration(store, tmp_path, 2, opts, model_in=tmp_path / "m1.json", reference=refs, sampling_in=tmp_path / "s1.json")

    ropts = wf.search_options(SEARCH, pad=2.0, symmetry="C1")
    engine = {}
    for h in (1, 2):
        rows = np.flatnonzero(col["half"] == h)
        volume, _ = h5.read_volume(refs[h])
        found = expect_particles(images, ctf, optics, rows, volume, m1["search"]["sigma2"][h - 1],
                                 m1["search"]["sigma_offset_A"][h - 1], col["eulers_deg"][rows], col["shifts_px"][rows],
                                 schedule=Schedule(**s1["schedule"]), perturb=s1["perturb"], r_max=m1["next_r_max"],
                                 opts=ropts)
        engine[h] = found
        tables = [h5.read_table(tmp_path / f"it2_poses_{h}_{s}.h5")[0] for s in (1, 2)]
        index = np.concatenate([t["index"] for t in tables])
        at = np.searchsorted(rows, index)
        np.testing.assert_array_equal(np.concatenate([t["eulers_deg"] for t in tables]), found.eulers[at])
        np.testing.assert_allclose(np.concatenate([t["shifts_px"] for t in tables]), found.shifts_px[at], atol=1e-12)
        np.testing.assert_allclose(np.concatenate([t["score"] for t in tables]), found.pmax[at], rtol=1e-9)
        shards = [h5.read_sums(tmp_path / f"it2_sums_{h}_{s}.h5") for s in (1, 2)]
        data, weight = shards[0][0] + shards[1][0], shards[0][1] + shards[1][1]
        np.testing.assert_allclose(data, found.data, rtol=1e-9, atol=1e-9 * np.abs(found.data).max())
        np.testing.assert_allclose(weight, found.weight, rtol=1e-9, atol=1e-9 * found.weight.max())
        noise = h5.read_noise(tmp_path / f"it2_sums_{h}.h5")
        for key in ("sigma2_sum", "sigma2_count", "offset_sum", "gamma_sum", "direction_mass"):
            np.testing.assert_allclose(noise[key], found.noise[key], rtol=1e-9)
    poses = lambda it, halves=(1, 2): [tmp_path / f"it{it}_poses_{h}_{s}.h5" for h in halves for s in (1, 2)]  # noqa: E731
    m2 = wf.model_update(tmp_path / "it2_sums_1.h5", tmp_path / "it2_sums_2.h5", tmp_path / "m2.json", iteration=2,
                         opts=model_opts(2), prev_model=tmp_path / "m1.json", poses=poses(2), prev_poses=poses(1),
                         prev_sampling=tmp_path / "s1.json")
    for h in (1, 2):
        np.testing.assert_allclose(m2["search"]["sigma2"][h - 1],
                                   update_sigma2(m1["search"]["sigma2"][h - 1], [engine[h].noise]), rtol=1e-9)
        assert m2["search"]["sigma_offset_A"][h - 1] == pytest.approx(update_sigma_offset([engine[h].noise]), rel=1e-9)
        # the learned direction prior of the half, for the order iteration 2 searched at
        np.testing.assert_allclose(m2["search"]["pdf_direction"][h - 1],
                                   direction_distribution(engine[h].noise["direction_mass"]), rtol=1e-9)
    assert m2["search"]["pdf_order"] == s1["schedule"]["order"]
    assert m2["search"]["angle_change_deg"] > 0 and 0 < m2["search"]["mean_pmax"] <= 1
    assert m2["search"]["schedule"]["smallest_angle_change"] == pytest.approx(m2["search"]["angle_change_deg"])
    missing = tmp_path / "half1_it2.h5"     # iteration 3 is the final one: no accuracy, no new sampling
    s2 = wf.next_sampling(store, tmp_path / "m2.json", missing, poses(2, (1,)), tmp_path / "s2.json", iteration=2,
                          opts=sampling_opts)
    assert s2["iteration"] == 3 and s2["schedule"] == m2["search"]["schedule"] and s2["perturb"] != s1["perturb"]
    # RELION's convergence (spec 5.7): fine enough sampling, no resolution gain, no large pose changes
    converge = {"until_converged": True, "max_iterations": 9, "initial_resolution_A": 20.0, "incr_size": 4,
                "iterations": 3}
    no_gain = {**m1, "current_resolution_inv_A": 1.0, "next_is_final": False}
    (tmp_path / "m1_no_gain.json").write_text(json.dumps(no_gain))
    for fine_enough in (False, True):
        sampled = {**s1, "schedule": {**s1["schedule"], "fine_enough": fine_enough, "smallest_angle_change": 0.0,
                                      "smallest_offset_change": 0.0}}
        (tmp_path / "s1_fine.json").write_text(json.dumps(sampled))
        m = wf.model_update(tmp_path / "it2_sums_1.h5", tmp_path / "it2_sums_2.h5", tmp_path / "m2c.json", iteration=2,
                            opts={"maxres_A": None, "tau2_fudge": 1.0, **wf.iteration_schedule(converge, 2), **search},
                            prev_model=tmp_path / "m1_no_gain.json", poses=poses(2), prev_poses=poses(1),
                            prev_sampling=tmp_path / "s1_fine.json")
        assert m["iterations_without_resolution_gain"] == 1
        assert m["converged"] == m["next_is_final"] == fine_enough


def test_low_resolution_join_of_the_halves(sim, tmp_path):
    """refine.low_resol_join_A: model_update averages the halves' sums within the join shell before
    the FSC (FSC 1 there), and the half maps are made from the joined sums (equal at low resolution,
    different above); without the other half's sums a half map is refused."""
    from omlrelion.refine.autorefine import join_shell

    store = tmp_path / "p.h5"
    wf.preprocess(sim, store, opts=PRE)
    schedule = {"iterations": 2, "until_converged": False, "max_iterations": 9, "initial_resolution_A": None,
                "incr_size": 4}
    opts = {"pad": 2.0, "maxres_A": None, "ctf": True, "precision": "single", "compression": COMPRESSION,
            "first": wf.first_iteration(schedule)}
    _iteration(store, tmp_path, 1, opts)
    model = {"maxres_A": None, "tau2_fudge": 1.0, **wf.iteration_schedule(schedule, 1)}
    plain = wf.model_update(tmp_path / "it1_sums_1.h5", tmp_path / "it1_sums_2.h5", tmp_path / "m.json", iteration=1,
                            opts=model)
    joined = wf.model_update(tmp_path / "it1_sums_1.h5", tmp_path / "it1_sums_2.h5", tmp_path / "mj.json",
                             iteration=1, opts={**model, "low_resol_join_A": 20.0})
    shell = joined["low_resol_join_shell"]
    assert plain["low_resol_join_shell"] is None and shell == join_shell(20.0, 24, 3.0, 12) == 4
    np.testing.assert_allclose(joined["fsc"][1:shell], 1.0, atol=1e-6)
    assert joined["fsc"][shell + 2:] == pytest.approx(plain["fsc"][shell + 2:], abs=1e-6)
    assert min(plain["fsc"][1:shell]) < 0.999
    rec = {"tau2_fudge": 1.0, "gridding_iterations": 0, "compression": COMPRESSION}
    maps = []
    for h in (1, 2):
        out = tmp_path / f"j{h}.h5"
        wf.reconstruct_half(tmp_path / f"it1_sums_{h}.h5", tmp_path / "mj.json", out, tmp_path / f"j{h}.mrc",
                            tmp_path / f"j{h}.star", half=h, iteration=1, opts=rec,
                            other_sums=tmp_path / f"it1_sums_{3 - h}.h5")
        maps.append(h5.read_volume(out)[0])
    curve = fsc(maps[0], maps[1])
    assert np.all(curve[1:shell - 1] > 0.999) and curve[shell + 2:12].min() < 0.99
    with pytest.raises(InputError, match="other half's sums are needed"):
        wf.reconstruct_half(tmp_path / "it1_sums_1.h5", tmp_path / "mj.json", tmp_path / "x.h5", tmp_path / "x.mrc",
                            tmp_path / "x.star", half=1, iteration=1, opts=rec)
