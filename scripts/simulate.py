# Snakemake script (the `snakemake` object is injected): the built-in phantom data set.
from omlrelion.pipeline import logs, workflow

logs.setup_logging(snakemake.log[0])
workflow.simulate_dataset(snakemake.output.star, opts=dict(snakemake.params.opts))
