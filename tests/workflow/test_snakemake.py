"""The Snakemake workflow: schema, dry run and lint, bad input, an end-to-end run of config/test.yaml,
reruns, a changed parameter, and a 2 x 2 sweep."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("snakemake", reason="pip install -e \".[workflow]\"")
pytest.importorskip("matplotlib", reason="pip install -e \".[workflow]\"")
import yaml  # noqa: E402  (installed with snakemake)

from omlrelion.io import h5
from omlrelion.io.mrc import read_map, write_map
from omlrelion.io.star import read_particles, read_star_table

from .conftest import REPO, TEST_CONFIG, job_counts, planned_outputs, snakemake

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
RUN = Path("results/tiny/default")


def write_config(folder: Path, config: dict) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_config(**sections) -> dict:
    config = yaml.safe_load(TEST_CONFIG.read_text())
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


# ---------------------------------------------------------------- schema and parse-time checks
def _leaves(schema: dict, node: dict, path: str):
    if "$ref" in node:
        target = schema["$defs"][node["$ref"].split("/")[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    props = node.get("properties")
    if props:
        for key, sub in props.items():
            yield from _leaves(schema, sub, f"{path}.{key}" if path else key)
    else:
        yield path, node


def test_every_key_is_typed_defaulted_and_described():
    schema = yaml.safe_load(SCHEMA.read_text())
    assert schema["additionalProperties"] is False
    sections = {k: v for k, v in schema["properties"].items() if k not in ("datasets", "parameter_sets")}
    leaves = list(_leaves(schema, {"properties": sections}, ""))
    leaves += list(_leaves(schema, schema["$defs"]["dataset"]["properties"]["simulate"], "simulate"))
    assert len(leaves) > 40
    for key, node in leaves:
        assert "description" in node, key
        assert "default" in node, key
        assert "type" in node or "enum" in node, key
    for name, node in schema["properties"].items():
        if node.get("type") == "object" and "properties" in node:
            assert node["additionalProperties"] is False, name


def test_schema_errors_name_the_keys(tmp_path):
    config = tiny_config(reconstruct={"pda": 2}, refine={"iterations": "three"}, store={"codec": "lz4"}, bogus=1)
    config["parameter_sets"] = {"p1": {"reconstruct": {"pad": "two"}}, "p2": {"refine": {"iteration": 3}}}
    proc = snakemake(tmp_path, "-n", "--configfile", str(write_config(tmp_path, config)), check=False)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    for text in ("config key 'reconstruct.pda' is not allowed", "config key 'refine.iterations': 'three' is not of type",
                 "config key 'store.codec': 'lz4' is not one of", "config key 'bogus' is not allowed",
                 "config key 'parameter_sets.p1.reconstruct.pad': 'two' is not of type",
                 "config key 'parameter_sets.p2.refine.iteration' is not allowed"):
        assert text in err, f"{text!r} not in:\n{err[-3000:]}"
    assert not (tmp_path / "results").exists()


def test_bad_input_stops_before_any_job(tmp_path):
    config = tiny_config(preprocess={"n_shards": 400})
    proc = snakemake(tmp_path, "-n", "--configfile", str(write_config(tmp_path, config)), check=False)
    assert proc.returncode != 0 and "preprocess.n_shards = 400 is larger than" in proc.stdout + proc.stderr
    config = tiny_config(reconstruct={"symmetry": "Q7"})
    proc = snakemake(tmp_path, "-n", "--configfile", str(write_config(tmp_path, config)), check=False)
    assert proc.returncode != 0 and "reconstruct.symmetry" in proc.stdout + proc.stderr
    (tmp_path / "data").mkdir()
    star = tmp_path / "data" / "particles.star"
    star.write_text("data_particles\nloop_\n_rlnImageName #1\n_rlnAngleRot #2\n_rlnAngleTilt #3\n"
                    "_rlnAnglePsi #4\n_rlnDefocusU #5\n000001@stack.mrcs 0 0 0 10000\n")
    config = tiny_config(datasets={"real": {"star": str(star)}})
    config["datasets"] = {"real": {"star": str(star)}}
    proc = snakemake(tmp_path, "-n", "--configfile", str(write_config(tmp_path, config)), check=False)
    assert proc.returncode != 0 and f"{star}:" in proc.stdout + proc.stderr and "stack.mrcs" in proc.stdout + proc.stderr
    wrong_box = tmp_path / "data" / "ref40.mrc"
    write_map(wrong_box, np.zeros((40, 40, 40), np.float32), 3.0)
    search = {"pose_search_order": 1}
    for refine, ref, message in (({}, wrong_box, "a reference map needs a pose search; set refine.pose_search_order"),
                                 (search, wrong_box, f"{wrong_box}: map of 40x40x40 px, the particles of dataset tiny"),
                                 (search, tmp_path / "none.mrc", f"{tmp_path / 'none.mrc'}: map not found")):
        config = tiny_config(refine=refine)
        config["datasets"]["tiny"]["reference"] = str(ref)
        proc = snakemake(tmp_path, "-n", "--configfile", str(write_config(tmp_path, config)), check=False)
        assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("config", ["config.yaml", "test.yaml"])
def test_dry_run_and_lint(tmp_path, config):
    path = str(REPO / "config" / config)
    dry = snakemake(tmp_path, "-n", "--configfile", path)
    counts = job_counts(dry.stdout)
    assert counts["expectation"] == 2 * 2 * (3 if config == "config.yaml" else 2)
    assert counts["postprocess"] == 1 and counts["sweep_summary"] == 1
    lint = snakemake(tmp_path, "--lint", "--configfile", path)
    assert "good condition" in lint.stdout + lint.stderr


# ---------------------------------------------------------------- end to end (config/test.yaml)
def test_outputs(tiny_run):
    folder, proc = tiny_run
    run = folder / RUN
    assert job_counts(proc.stdout + proc.stderr)["expectation"] == 8
    for name in ("final/run_class001.mrc", "final/run_half1_class001_unfil.mrc", "final/run_half2_class001_unfil.mrc",
                 "final/run_model.star", "final/run_data.star", "final/angdist.png", "it001/run_it001_half1_class001.mrc",
                 "it001/run_it001_half2_model.star", "postprocess/postprocess.mrc", "postprocess/postprocess_masked.mrc",
                 "postprocess/postprocess.star", "postprocess/postprocess_fsc.png", "postprocess/postprocess_guinier.png",
                 "postprocess/central_slices.png", "summary.json"):
        assert (run / name).is_file(), name
    volume, angpix = read_map(run / "final/run_class001.mrc")
    assert volume.shape == (32, 32, 32) and angpix == 3.0
    data = read_particles(run / "final/run_data.star")
    source = read_particles(folder / "results/tiny/input/particles.star")
    assert data.n_particles == 600
    np.testing.assert_allclose(data.eulers_deg, source.eulers_deg)  # known poses, kept
    np.testing.assert_allclose(data.shifts_px, source.shifts_px, atol=1e-9)
    np.testing.assert_array_equal(data.random_subset, source.random_subset)
    fsc = read_star_table(run / "postprocess/postprocess.star", block="fsc")
    assert len(fsc) == 17 and fsc["rlnFourierShellCorrelationCorrected"].iloc[1] > 0.99
    attrs = h5.read_attrs(run / "it002/sums_half1_shard2.h5")
    assert (attrs["box_size"], attrs["pad"], attrs["r_max"], attrs["iteration"], attrs["angpix"]) == (32, 2.0, 16, 2, 3.0)
    assert attrs["config_hash"] and attrs["omlrelion_version"]


def test_resolution_within_bound_of_truth(tiny_run):
    """Bound: the gold-standard resolution (corrected FSC 0.143) lies within one Fourier shell of
    the resolution where the final map's FSC against the phantom it was simulated from drops
    below 0.5 (what the data allow), and the map correlates with the phantom."""
    folder, _ = tiny_run
    summary = json.loads((folder / RUN / "summary.json").read_text())
    box, angpix = summary["box_size"], summary["angpix"]
    gold, truth = box * angpix / summary["resolution_A"], box * angpix / summary["resolution_vs_truth_A"]
    assert abs(gold - truth) <= 1.0, summary
    assert summary["resolution_A"] <= 15.0
    final, _ = read_map(folder / RUN / "final/run_class001.mrc")
    phantom, _ = read_map(folder / "results/tiny/input/particles_phantom.mrc")
    assert np.corrcoef(final.ravel(), phantom.ravel())[0, 1] > 0.9
    for kind in ("particles", "sums", "volumes", "poses"):
        assert summary["compression"][kind]["ratio"] > 1.0, kind
    assert summary["r_max_per_iteration"] == [5, 16]


def test_rerun_does_nothing(tiny_run):
    folder, _ = tiny_run
    proc = snakemake(folder, "--cores", "2", "--configfile", str(TEST_CONFIG))
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_changed_parameter_reruns_only_dependent_jobs(tiny_run, tmp_path):
    folder, _ = tiny_run
    work = tmp_path / "copy"
    shutil.copytree(folder, work, symlinks=True)
    post = write_config(work, tiny_config(postprocess={"mask_edge_px": 4}))
    proc = snakemake(work, "--cores", "2", "--configfile", str(post))
    assert job_counts(proc.stdout + proc.stderr) == {"postprocess": 1, "run_summary": 1, "sweep_summary": 1,
                                                     "all": 1, "total": 4}
    fudge = write_config(work, tiny_config(postprocess={"mask_edge_px": 4}, reconstruct={"tau2_fudge": 2.0}))
    outputs = planned_outputs(snakemake(work, "-n", "--configfile", str(fudge)).stdout)
    assert any(f.endswith("it001/model.json") for f in outputs)
    assert not any("it001/sums" in f or "it001/poses" in f or "preprocess" in f or "input/" in f for f in outputs)


# ---------------------------------------------------------------- sweep
def test_sweep_two_datasets_two_parameter_sets(tmp_path):
    small = {"n_particles": 200, "box_size": 24, "angpix": 3.0, "snr": 1.0, "shift_max_px": 1.0}
    config = {
        "datasets": {"phantomA": {"simulate": {**small, "seed": 1}},
                     "phantomB": {"simulate": {**small, "seed": 2, "phantom_seed": 7}}},
        "parameter_sets": {"pad2": {}, "pad1": {"reconstruct": {"pad": 1}, "store": {"codec": "blosc2"}}},
        "preprocess": {"n_shards": 1},
        "refine": {"until_converged": True, "max_iterations": 3, "initial_resolution_A": 15.0},
        "postprocess": {"fit_low_A": 30.0},
    }
    proc = snakemake(tmp_path, "--cores", "2", "--configfile", str(write_config(tmp_path, config)))
    assert proc.returncode == 0
    lines = (tmp_path / "results/summary.tsv").read_text().splitlines()
    header, rows = lines[0].split("\t"), [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]
    assert "resolution_A" in header and "ratio_sums" in header and "cpu_wall_s" in header
    assert sorted((r["dataset"], r["parameter_set"], r["pad"]) for r in rows) == [
        ("phantomA", "pad1", "1"), ("phantomA", "pad2", "2"), ("phantomB", "pad1", "1"), ("phantomB", "pad2", "2")]
    for r in rows:
        assert float(r["resolution_A"]) < 20 and float(r["ratio_sums"]) > 1 and 2 <= int(r["iterations"]) <= 3
    assert (tmp_path / "results/summary.md").read_text().count("\n| phantom") == 4
    again = snakemake(tmp_path, "--cores", "2", "--configfile", str(tmp_path / "config.yaml"))
    assert "Nothing to be done" in again.stdout + again.stderr


def test_report(tiny_run):
    folder, _ = tiny_run
    snakemake(folder, "--report", "report.html", "--configfile", str(TEST_CONFIG))
    html = (folder / "report.html").read_text(errors="ignore")
    for name in ("postprocess_fsc.png", "central_slices.png", "angdist.png", "summary.md"):
        assert name in html, name


def test_pose_search_follows_the_refinement_schedule(tmp_path):
    """refine.pose_search_order with until_converged: from iteration 2 each shard searches every
    particle's pose against its half map (the refinement engine's E-step), with the sampling that
    the previous iteration's `sampling` job chose: global HEALPix order 1 first, then, once an
    iteration gains no resolution and moves no poses much, order 2 with local searches and finer
    offsets (auto_local_order 2). The poses written come back near the simulated ones, the noise
    spectra and offset priors are re-estimated each iteration, and the run reaches the test's
    resolution bound."""
    from omlrelion.geometry.euler import euler_to_matrix

    refine = {"pose_search_order": 1, "offset_range_px": 2.0, "offset_step_px": 1.0, "auto_local_order": 2,
              "max_healpix_order": 2, "until_converged": True, "max_iterations": 5}
    config = write_config(tmp_path, tiny_config(refine=refine))
    snakemake(tmp_path, "--cores", "2", "--configfile", str(config))
    truth = read_particles(tmp_path / "results/tiny/input/particles.star")
    found = read_particles(tmp_path / RUN / "final/run_data.star")
    assert np.array_equal(truth.image_indices, found.image_indices)
    cos = (np.einsum("mij,mij->m", euler_to_matrix(found.eulers_deg), euler_to_matrix(truth.eulers_deg)) - 1) / 2
    errors = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    assert np.median(errors) < 15.0 and np.any(errors > 0.5)      # searched (not the input), and near it
    models = sorted((tmp_path / RUN).glob("it*/model.json"))
    final = json.loads(models[-1].read_text())
    assert final["final"] and len(models) <= 5
    samplings = [json.loads(p.read_text()) for p in sorted((tmp_path / RUN).glob("it*/sampling.json"))]
    assert [s["iteration"] for s in samplings] == list(range(2, len(models) + 1))
    orders = [(s["schedule"]["order"], s["schedule"]["local"]) for s in samplings]
    assert orders[0] == (1, False) and (2, True) in orders, orders
    sigma2 = [json.loads(p.read_text())["search"]["sigma2"][0] for p in models]
    assert all(np.all(np.asarray(s) > 0) for s in sigma2) and sigma2[1] != sigma2[2]
    summary = json.loads((tmp_path / RUN / "summary.json").read_text())
    assert summary["resolution_A"] <= 15.0
    searched = summary["pose_search"]
    assert searched["healpix_order"] == [None] + [s["schedule"]["order"] for s in samplings]   # iteration 1 kept poses
    assert searched["local"][1:] == [s["schedule"]["local"] for s in samplings]
    assert all(0 < p <= 1 for p in searched["mean_pmax"][1:])


def test_refinement_from_a_reference_map(tmp_path):
    """datasets.<name>.reference: a refinement from scratch, as relion_refine --ref, with RELION's GUI
    options (zero mask, solvent flattening, halves joined below 40 A). The STAR file's poses are all
    zero; start/ holds the reference low-passed to ini_high_A as both halves' map, each half's
    starting noise spectrum and the first sampling, and iteration 1 already searches every pose
    globally. The poses found come back near the simulated ones."""
    from omlrelion.geometry.euler import euler_to_matrix
    from omlrelion.io.star import write_particles
    from omlrelion.pipeline.simulate import SimulateParams, simulate

    (tmp_path / "data").mkdir()
    simulate("phantom", tmp_path / "data" / "particles",
             SimulateParams(n_particles=600, box_size=32, angpix=3.0, snr=0.5, shift_max_px=1.0, defocus_min=8000,
                            defocus_max=20000), seed=3)
    truth = read_particles(tmp_path / "data" / "particles.star")
    zero = replace(truth, eulers_deg=np.zeros_like(truth.eulers_deg), shifts_px=np.zeros_like(truth.shifts_px))
    write_particles(tmp_path / "data" / "zeroed.star", zero)
    config = tiny_config(refine={"pose_search_order": 1, "offset_range_px": 2.0, "offset_step_px": 1.0,
                                 "ini_high_A": 20.0, "iterations": 3, "zero_mask": True, "flatten_solvent": True,
                                 "low_resol_join_A": 40.0})
    config["datasets"] = {"tiny": {"star": "data/zeroed.star", "reference": "data/particles_phantom.mrc"}}
    snakemake(tmp_path, "--cores", "2", "--configfile", str(write_config(tmp_path, config)))
    start = json.loads((tmp_path / RUN / "start/model.json").read_text())
    assert start["iteration"] == 0 and start["r_star"] == 5 and start["next_r_max"] == 15
    first = json.loads((tmp_path / RUN / "it001/model.json").read_text())
    assert first["search"]["angle_change_deg"] > 10        # iteration 1 searched (from the zero poses)
    assert first["low_resol_join_shell"] == 3 and first["fsc"][1] == pytest.approx(1.0)   # 96 A / 40 A
    found = read_particles(tmp_path / RUN / "final/run_data.star")
    cos = (np.einsum("mij,mij->m", euler_to_matrix(found.eulers_deg), euler_to_matrix(truth.eulers_deg)) - 1) / 2
    errors = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    assert np.median(errors) < 15.0, np.median(errors)
    assert np.median(np.linalg.norm(found.shifts_px - truth.shifts_px, axis=1)) < 1.0
    summary = json.loads((tmp_path / RUN / "summary.json").read_text())
    assert summary["resolution_A"] <= 15.0
