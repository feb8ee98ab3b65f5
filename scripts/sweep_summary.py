# Snakemake script: the table of all runs (dataset x parameter set).
from omlrelion.pipeline import logs, workflow

logs.setup_logging(snakemake.log[0])
workflow.sweep_table(list(snakemake.input.summaries), snakemake.output.tsv, snakemake.output.md)
