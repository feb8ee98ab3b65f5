# Snakemake script: run_data.star with the final poses, and the angular distribution plot.
from omlrelion.pipeline import logs, workflow

logs.setup_logging(snakemake.log[0])
workflow.export_particles(snakemake.input.star, snakemake.input.store, list(snakemake.input.poses),
                          snakemake.output.star, snakemake.output.png, iteration=int(snakemake.params.it))
