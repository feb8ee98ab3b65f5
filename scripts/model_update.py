# Snakemake script: gold-standard FSC of the two halves' sums and the iteration schedule.
from omlrelion.pipeline import logs, workflow

logs.setup_logging(snakemake.log[0])
workflow.model_update(snakemake.input.sums1, snakemake.input.sums2, snakemake.output.model,
                      iteration=int(snakemake.wildcards.it), opts=dict(snakemake.params.opts),
                      prev_model=snakemake.input.get("prev"), poses=list(snakemake.input.get("poses", [])),
                      prev_poses=list(snakemake.input.get("prev_poses", [])),
                      prev_sampling=snakemake.input.get("prev_sampling"), store=snakemake.input.get("store"))
