# Snakemake script: STAR + stacks -> HDF5 particle store.
from omlrelion.pipeline import logs, workflow

logs.setup_logging(snakemake.log[0])
workflow.preprocess(snakemake.input.star, snakemake.output.store, opts=dict(snakemake.params.opts))
