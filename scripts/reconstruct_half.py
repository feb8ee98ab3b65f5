# Snakemake script: the MAP half map of one iteration (HDF5 for the next iteration, MRC and model.star).
from omlrelion.pipeline import logs, workflow

logs.setup_logging(snakemake.log[0])
workflow.reconstruct_half(
    snakemake.input.sums, snakemake.input.model, snakemake.output.volume, snakemake.output.mrc,
    snakemake.output.model_star, half=int(snakemake.wildcards.half), iteration=int(snakemake.wildcards.it),
    opts=dict(snakemake.params.opts), devices=workflow.job_devices(snakemake.resources.get("gpu", 0)),
    other_sums=snakemake.input.get("other"))
