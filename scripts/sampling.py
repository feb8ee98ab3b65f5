# Snakemake script: the pose search's sampling of the next iteration.
from omlrelion.pipeline import logs, workflow

logs.setup_logging(snakemake.log[0])
workflow.next_sampling(snakemake.input.store, snakemake.input.model, snakemake.input.half1, list(snakemake.input.poses),
                       snakemake.output.sampling, iteration=int(snakemake.wildcards.it), opts=dict(snakemake.params.opts),
                       device=workflow.job_device(snakemake.resources.get("gpu", 0)))
