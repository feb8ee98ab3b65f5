# Snakemake script: the final joined map (run_class001.mrc) and run_model.star.
from omlrelion.pipeline import logs, workflow

logs.setup_logging(snakemake.log[0])
workflow.reconstruct_joined(snakemake.input.sums1, snakemake.input.sums2, snakemake.input.model,
                            snakemake.output.mrc, snakemake.output.model_star, iteration=int(snakemake.params.it),
                            opts=dict(snakemake.params.opts),
                            devices=workflow.job_devices(snakemake.resources.get("gpu", 0)))
