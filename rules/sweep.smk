# One summary per run (resolution, time, memory, compression per file type) and the table of all runs.


rule run_summary:
    input:
        unpack(summary_inputs),
    output:
        json=join(RUN, "summary.json"),
    params:
        overrides=lambda wc: canonical(config["parameter_sets"][wc.pset]),
        benchmarks=[join(RUN, "benchmarks"), join(DATA, "benchmarks")],
    log:
        join(RUN, "logs/run_summary.log"),
    conda:
        "../workflow/envs/omlrelion.yaml"
    script:
        "../scripts/run_summary.py"


rule sweep_summary:
    input:
        summaries=[join(RUN.format(dataset=d, pset=p), "summary.json") for d, p in runs()],
    output:
        tsv=join(RESULTS, "summary.tsv"),
        md=report(join(RESULTS, "summary.md"), category="Summary"),
    log:
        join(RESULTS, "logs/sweep_summary.log"),
    conda:
        "../workflow/envs/omlrelion.yaml"
    script:
        "../scripts/sweep_summary.py"
