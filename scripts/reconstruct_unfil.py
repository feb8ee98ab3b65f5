# Snakemake script: the final iteration's unregularised half map (run_half{h}_class001_unfil.mrc).
from omlrelion.pipeline import logs, workflow

logs.setup_logging(snakemake.log[0])
half = int(snakemake.wildcards.half)
workflow.reconstruct_unfil(snakemake.input[f"sums{half}"], snakemake.input.model, snakemake.output.mrc, half=half,
                           iteration=int(snakemake.params.it), opts=dict(snakemake.params.opts),
                           devices=workflow.job_devices(snakemake.resources.get("gpu", 0)),
                           other_sums=snakemake.input[f"sums{3 - half}"])
