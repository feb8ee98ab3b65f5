# Snakemake script: a pose-search run's starting state from its reference map.
from omlrelion.pipeline import logs, workflow

logs.setup_logging(snakemake.log[0])
n_shards = len(snakemake.output.poses) // 2
workflow.initial_model(
    snakemake.input.store, snakemake.input.reference, snakemake.output.model, snakemake.output.sampling,
    list(snakemake.output.volumes),
    {(1 + i // n_shards, 1 + i % n_shards): path for i, path in enumerate(snakemake.output.poses)},
    opts=dict(snakemake.params.opts))
