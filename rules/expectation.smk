# Per iteration, half set and shard: current poses -> poses file, back-projection -> partial sums.
# Pose search is not implemented yet: the poses are kept (see docs/workflow.md). From iteration 2
# on the job also reads its half's previous map (the reference a pose search needs).


rule expectation:
    input:
        unpack(expectation_inputs),
    output:
        sums=join(IT, "sums_half{half}_shard{shard}.h5"),
        poses=join(IT, "poses_half{half}_shard{shard}.h5"),
    params:
        opts=expectation_opts,
    log:
        join(RUN, "logs/it{it}/expectation_half{half}_shard{shard}.log"),
    benchmark:
        join(RUN, "benchmarks/it{it}/expectation_half{half}_shard{shard}.tsv")
    conda:
        "../workflow/envs/omlrelion.yaml"
    script:
        "../scripts/expectation.py"
