# Snakemake script: add the shards' sums of one half set, Hermitian repair, symmetrise.
from omlrelion.pipeline import logs, workflow

logs.setup_logging(snakemake.log[0])
workflow.merge_sums(list(snakemake.input.shards), snakemake.output.sums, half=int(snakemake.wildcards.half),
                    iteration=int(snakemake.wildcards.it), opts=dict(snakemake.params.opts))
