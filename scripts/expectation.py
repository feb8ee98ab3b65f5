# Snakemake script: one shard of one half set, one iteration.
from omlrelion.pipeline import logs, workflow

logs.setup_logging(snakemake.log[0])
workflow.expectation_shard(
    snakemake.input.store, snakemake.output.sums, snakemake.output.poses,
    half=int(snakemake.wildcards.half), shard=int(snakemake.wildcards.shard), iteration=int(snakemake.wildcards.it),
    opts=dict(snakemake.params.opts), poses_in=snakemake.input.get("poses"), model_in=snakemake.input.get("model"),
    reference=snakemake.input.get("reference"), sampling_in=snakemake.input.get("sampling"),
    device=workflow.job_device(snakemake.resources.get("gpu", 0)))
