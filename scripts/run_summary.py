# Snakemake script: one run's summary (resolution, time, memory, compression per file type).
from omlrelion.pipeline import logs, workflow

logs.setup_logging(snakemake.log[0])
inp = snakemake.input
stores = {"particles": [inp.particles], "sums": list(inp.sums), "volumes": list(inp.volumes), "poses": list(inp.poses)}
workflow.run_summary(snakemake.output.json, dataset=snakemake.wildcards.dataset, parameter_set=snakemake.wildcards.pset,
                     overrides=dict(snakemake.params.overrides), models=list(inp.models),
                     postprocess_json=inp.postprocess, stores=stores, benchmark_dirs=list(snakemake.params.benchmarks),
                     final_map=inp.final_map, phantom=inp.get("phantom"))
