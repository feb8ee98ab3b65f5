# Helpers: config checks with key names, per-run configs, paths, input and params functions,
# and the final targets. Logic beyond that lives in omlrelion.pipeline.workflow.
import json
from os.path import join
from pathlib import Path

import jsonschema
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

from omlrelion.errors import InputError
from omlrelion.geometry.symmetry import point_group_matrices
from omlrelion.pipeline import workflow as wf

SECTIONS = ("refine", "reconstruct", "store", "postprocess")
RESULTS = config.get("results", "results")
DATA = join(RESULTS, "{dataset}")
RUN = join(DATA, "{pset}")
IT = join(RUN, "it{it}")
FINAL = join(RUN, "final")
START = join(RUN, "start")
POST = join(RUN, "postprocess")
STORE = join(DATA, "preprocess", "particles.h5")
SIMULATED = join(DATA, "input", "particles.star")
PHANTOM = join(DATA, "input", "particles_phantom.mrc")


wildcard_constraints:
    dataset="[A-Za-z0-9_-]+",
    pset="[A-Za-z0-9_-]+",
    it="[0-9]{3}",
    half="[12]",
    shard="[0-9]+",


def check_config(cfg, schema):
    """Stop before any job with one line per schema violation, each naming its config key."""
    path = Path(workflow.basedir) / schema
    validator = jsonschema.Draft202012Validator(yaml.safe_load(path.read_text()))
    problems = []
    for err in validator.iter_errors(cfg):
        key = ".".join(str(p) for p in err.absolute_path)
        where = f"config key '{key}'" if key else "config"
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = sorted(err.schema.get("properties", {}))
            for extra in sorted(set(err.instance) - set(allowed)):
                name = f"{key}.{extra}" if key else extra
                problems.append(f"config key '{name}' is not allowed (allowed here: {', '.join(allowed)})")
        elif err.validator == "oneOf":
            problems.append(f"{where}: give exactly one of 'star' and 'simulate'")
        else:
            problems.append(f"{where}: {err.message}")
    if problems:
        raise WorkflowError("invalid configuration:\n  " + "\n  ".join(sorted(set(problems))))


def run_config(pset):
    """The refine/reconstruct/store/postprocess sections with parameter set `pset` applied."""
    over = config["parameter_sets"][pset]
    return {s: {**config[s], **over.get(s, {})} for s in SECTIONS}


def check_inputs():
    """Parse-time checks of the data (STAR files and stacks, shard counts, symmetry symbols)."""
    pre = config["preprocess"]
    try:
        for pset in config["parameter_sets"]:
            try:
                point_group_matrices(run_config(pset)["reconstruct"]["symmetry"])
            except (InputError, ValueError) as exc:
                raise InputError(f"config key 'reconstruct.symmetry' (parameter set {pset}): {exc}") from None
        ctf = any(run_config(p)["refine"]["ctf"] for p in config["parameter_sets"])
        for name, ds in config["datasets"].items():
            if "reference" in ds:
                for pset in config["parameter_sets"]:
                    if not pose_search(pset):
                        raise InputError(f"config key 'datasets.{name}.reference': a reference map needs a pose "
                                         f"search; set refine.pose_search_order (parameter set {pset})")

            reference = ds.get("reference") if workflow.is_main_process else None
            if "simulate" in ds:
                sim = ds["simulate"]
                wf.check_box(pre["box_size"], sim["box_size"], f"dataset {name}")
                wf.check_shards(pre["n_shards"], sim["n_particles"], f"dataset {name}")
                if reference is not None:
                    box = pre["box_size"] or sim["box_size"]
                    wf.check_reference(reference, box_size=box, angpix=sim["angpix"] * sim["box_size"] / box,
                                       what=f"dataset {name}")
            elif workflow.is_main_process:  # jobs re-read the Snakefile; the main process checked
                wf.check_particles(ds["star"], n_shards=pre["n_shards"], ctf=ctf, box_size=pre["box_size"],
                                   reference=reference)
    except InputError as exc:
        raise WorkflowError(str(exc)) from None


def prepare_restart():
    """Main process only, before the DAG. When no other Snakemake of this folder runs, drop the locks
    and partial outputs a killed run left (wf.claim_folder, wf.release_stale_locks). With
    `verify_intermediates`, check the HDF5 intermediates the configured runs can use (wf.verify_stores;
    a store unchanged since it last passed is not read again) and mark each corrupt one as the
    output of an unfinished job (wf.mark_incomplete): rerun-incomplete recomputes it and everything
    after it."""
    if not workflow.is_main_process:
        return
    lines = wf.release_stale_locks(".snakemake", RESULTS) if wf.claim_folder(".snakemake") else []
    if config.get("verify_intermediates", True):
        stores = []
        for dataset in config["datasets"]:
            stores += Path(DATA.format(dataset=dataset), "preprocess").glob("*.h5")
            for pset in config["parameter_sets"]:
                stores += Path(START.format(dataset=dataset, pset=pset)).glob("*.h5")
                refine = run_config(pset)["refine"]
                last = refine["max_iterations"] if refine["until_converged"] else refine["iterations"]
                for i in range(1, last + 1):
                    stores += Path(IT.format(dataset=dataset, pset=pset, it=itname(i))).glob("*.h5")
        corrupt = wf.verify_stores(stores, Path(".snakemake", "omlrelion", "verified.json"))
        for path, reason in corrupt.items():
            wf.mark_incomplete(path, ".snakemake")
            lines.append(f"omlrelion: {path} failed verification: {reason}; marked incomplete: the run recomputes "
                         f"it and everything after it")
    for line in lines:
        logger.warning(line)


def report_retries(logs):
    """onsuccess/onerror: one line counting the failed job attempts that were retried (Snakemake's
    log files, `logs`: a path or a list of paths)."""
    retried = []
    for path in [logs] if isinstance(logs, str) else logs:
        try:
            retried += wf.retried_jobs(Path(path).read_text(errors="replace"))
        except OSError:
            pass
    if retried:
        logger.warning(f"omlrelion: {len(retried)} failed job attempt(s) retried: {'; '.join(retried)}")


def runs():
    return [(d, p) for d in config["datasets"] for p in config["parameter_sets"]]


def shards():
    return range(1, config["preprocess"]["n_shards"] + 1)


def itname(i):
    return f"{int(i):03d}"


def input_star(wc):
    ds = config["datasets"][wc.dataset]
    return ds["star"] if "star" in ds else SIMULATED.format(dataset=wc.dataset)


def final_iteration(dataset, pset):
    """F: `iterations`, or, until converged, the first iteration whose model.json says final."""
    refine = run_config(pset)["refine"]
    if not refine["until_converged"]:
        return refine["iterations"]
    for i in range(1, refine["max_iterations"] + 1):
        model = checkpoints.model_update.get(dataset=dataset, pset=pset, it=itname(i)).output.model
        if json.loads(Path(model).read_text())["final"]:
            return i
    raise WorkflowError(f"run {dataset}, {pset}: no final iteration within refine.max_iterations")


def final_it(wc):
    return itname(final_iteration(wc.dataset, wc.pset))


# ---------------------------------------------------------------- params
# Snakemake compares params by their text, so every dict is sorted: reordering keys in the
# config file must not rerun anything.
def canonical(value):
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    return value


def sorted_params(func):
    return lambda wc: canonical(func(wc))


@sorted_params
def simulate_opts(wc):
    return config["datasets"][wc.dataset]["simulate"]


@sorted_params
def preprocess_opts(wc):
    return {**config["preprocess"], "compression": config["store"]}


SEARCH_KEYS = ("pose_search_order", "offset_range_px", "offset_step_px", "auto_local_order", "max_healpix_order",
               "sampling_schedule", "oversampling", "particle_diameter_A", "sigma_offset_A", "zero_mask", "perturb",
               "seed")


def pose_search(pset):
    return run_config(pset)["refine"]["pose_search_order"] is not None


def search_opts(rc):
    """With a pose search: its options and the point group (the asymmetric unit it covers)."""
    if rc["refine"]["pose_search_order"] is None:
        return {}
    return {"search": {k: rc["refine"][k] for k in SEARCH_KEYS}, "symmetry": rc["reconstruct"]["symmetry"]}


@sorted_params
def expectation_opts(wc):
    rc = run_config(wc.pset)
    opts = {"pad": rc["reconstruct"]["pad"], "maxres_A": rc["reconstruct"]["maxres_A"],
            "ctf": rc["refine"]["ctf"], "precision": rc["refine"]["precision"], "compression": rc["store"],
            **search_opts(rc)}
    if int(wc.it) == 1:
        opts["first"] = wf.first_iteration(rc["refine"])
    return opts


@sorted_params
def initial_opts(wc):
    rc = run_config(wc.pset)
    return {"ini_high_A": rc["refine"]["ini_high_A"], "incr_size": rc["refine"]["incr_size"],
            "maxres_A": rc["reconstruct"]["maxres_A"], "first": wf.first_iteration(rc["refine"]),
            "compression": rc["store"], **search_opts(rc)}


@sorted_params
def sampling_opts(wc):
    rc = run_config(wc.pset)
    return {"pad": rc["reconstruct"]["pad"], "ctf": rc["refine"]["ctf"], **search_opts(rc)}


@sorted_params
def merge_opts(wc):
    rc = run_config(wc.pset)
    return {"symmetry": rc["reconstruct"]["symmetry"], "compression": rc["store"]}


@sorted_params
def model_opts(wc):
    rc = run_config(wc.pset)
    opts = {"maxres_A": rc["reconstruct"]["maxres_A"], "tau2_fudge": rc["reconstruct"]["tau2_fudge"],
            **wf.iteration_schedule(rc["refine"], int(wc.it)), **search_opts(rc)}
    if rc["refine"]["low_resol_join_A"] is not None:
        opts["low_resol_join_A"] = rc["refine"]["low_resol_join_A"]
    return opts


@sorted_params
def reconstruct_opts(wc):
    rc = run_config(wc.pset)
    return {"tau2_fudge": rc["reconstruct"]["tau2_fudge"],
            "gridding_iterations": rc["reconstruct"]["gridding_iterations"], "compression": rc["store"]}


@sorted_params
def half_map_opts(wc):
    """reconstruct_opts and, with refine.flatten_solvent, the particle diameter of the soft sphere."""
    rc = run_config(wc.pset)
    opts = reconstruct_opts(wc)
    if rc["refine"]["flatten_solvent"]:
        opts["flatten_solvent"] = {"particle_diameter_A": rc["refine"]["particle_diameter_A"]}
    return opts


@sorted_params
def postprocess_opts(wc):
    return run_config(wc.pset)["postprocess"]


# ---------------------------------------------------------------- inputs
def shard_poses(wc, it, halves=(1, 2)):
    base = IT.format(dataset=wc.dataset, pset=wc.pset, it=itname(it))
    return [join(base, f"poses_half{h}_shard{s}.h5") for h in halves for s in shards()]


def has_reference(dataset):
    return "reference" in config["datasets"][dataset]


def previous(wc, it):
    """The folder of iteration it - 1: start/ for iteration 1 of a run from a reference map."""
    if it == 1:
        return START.format(dataset=wc.dataset, pset=wc.pset)
    return IT.format(dataset=wc.dataset, pset=wc.pset, it=itname(it - 1))


def start_poses(wc):
    return [join(START.format(dataset=wc.dataset, pset=wc.pset), f"poses_half{h}_shard{s}.h5")
            for h in (1, 2) for s in shards()]


def expectation_inputs(wc):
    inputs = {"store": STORE.format(dataset=wc.dataset)}
    it = int(wc.it)
    if it > 1 or has_reference(wc.dataset):
        prev = previous(wc, it)
        inputs.update(poses=join(prev, f"poses_half{wc.half}_shard{wc.shard}.h5"), model=join(prev, "model.json"),
                      reference=join(prev, f"half{wc.half}.h5"))
        if pose_search(wc.pset):
            inputs["sampling"] = join(prev, "sampling.json")
    return inputs


def model_inputs(wc):
    it = int(wc.it)
    base = IT.format(dataset=wc.dataset, pset=wc.pset, it=wc.it)
    inputs = {"sums1": join(base, "sums_half1.h5"), "sums2": join(base, "sums_half2.h5")}
    if it > 1 or has_reference(wc.dataset):
        prev = previous(wc, it)
        inputs["prev"] = join(prev, "model.json")
        if pose_search(wc.pset):
            inputs.update(poses=shard_poses(wc, it),
                          prev_poses=shard_poses(wc, it - 1) if it > 1 else start_poses(wc),
                          prev_sampling=join(prev, "sampling.json"))
    elif pose_search(wc.pset):
        inputs["store"] = STORE.format(dataset=wc.dataset)  # the starting noise spectra
    return inputs


def half_map_inputs(wc):
    """With refine.low_resol_join_A, the other half's sums (the halves are averaged at low resolution)."""
    if run_config(wc.pset)["refine"]["low_resol_join_A"] is None:
        return {}
    base = IT.format(dataset=wc.dataset, pset=wc.pset, it=wc.it)
    return {"other": join(base, f"sums_half{3 - int(wc.half)}.h5")}


def sampling_inputs(wc):
    base = IT.format(dataset=wc.dataset, pset=wc.pset, it=wc.it)
    return {"store": STORE.format(dataset=wc.dataset), "model": join(base, "model.json"),
            "half1": join(base, "half1.h5"), "poses": shard_poses(wc, int(wc.it), halves=(1,))}


def final_inputs(wc):
    base = IT.format(dataset=wc.dataset, pset=wc.pset, it=final_it(wc))
    return {"sums1": join(base, "sums_half1.h5"), "sums2": join(base, "sums_half2.h5"), "model": join(base, "model.json")}


def final_poses(wc):
    base = IT.format(dataset=wc.dataset, pset=wc.pset, it=final_it(wc))
    return [join(base, f"poses_half{h}_shard{s}.h5") for h in (1, 2) for s in shards()]


def summary_inputs(wc):
    f = final_iteration(wc.dataset, wc.pset)
    run = RUN.format(dataset=wc.dataset, pset=wc.pset)
    its = [IT.format(dataset=wc.dataset, pset=wc.pset, it=itname(i)) for i in range(1, f + 1)]
    inputs = {
        "models": [join(b, "model.json") for b in its],
        "postprocess": join(run, "postprocess/postprocess.json"),
        "final_map": join(run, "final/run_class001.mrc"),
        "run_data": join(run, "final/run_data.star"),
        "particles": STORE.format(dataset=wc.dataset),
        "sums": [join(b, f"sums_half{h}_shard{s}.h5") for b in its for h in (1, 2) for s in shards()]
        + [join(b, f"sums_half{h}.h5") for b in its for h in (1, 2)],
        "volumes": [join(b, f"half{h}.h5") for b in its[:-1] for h in (1, 2)],
        "poses": [join(b, f"poses_half{h}_shard{s}.h5") for b in its for h in (1, 2) for s in shards()],
    }
    if "simulate" in config["datasets"][wc.dataset]:
        inputs["phantom"] = PHANTOM.format(dataset=wc.dataset)
    return inputs


def run_targets(dataset, pset):
    run = RUN.format(dataset=dataset, pset=pset)
    final = ("run_class001.mrc", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc",
             "run_model.star", "run_data.star", "angdist.png")
    post = ("postprocess.mrc", "postprocess_masked.mrc", "postprocess.star", "postprocess_fsc.png")
    return ([join(run, "final", name) for name in final] + [join(run, "postprocess", name) for name in post]
            + [join(run, "summary.json")])


def final_outputs():
    out = [join(RESULTS, "summary.tsv"), join(RESULTS, "summary.md")]
    for dataset, pset in runs():
        out += run_targets(dataset, pset)
    return out
