# Snakemake script: relion_postprocess on the final unfiltered half maps.
from omlrelion.pipeline import logs, workflow

logs.setup_logging(snakemake.log[0])
outputs = {name: snakemake.output[name] for name in
           ("map", "masked_map", "star", "json", "fsc_png", "guinier_png", "slices_png")}
workflow.postprocess(snakemake.input.half1, snakemake.input.half2, outputs, opts=dict(snakemake.params.opts))
