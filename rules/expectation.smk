# Per iteration, half set and shard: poses -> poses file, back-projection -> partial sums. With a
# pose search (refine.pose_search_order), every iteration after the first searches the poses
# against the half's previous map with the sampling the previous iteration's `sampling` job chose
# (docs/workflow.md); otherwise the poses are kept.


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


# Pose search: the next iteration's sampling (accuracy of half 1's first 100 particles against its
# new map, RELION's sampling updates, the grids' perturbation).
rule sampling:
    input:
        unpack(sampling_inputs),
    output:
        sampling=join(IT, "sampling.json"),
    params:
        opts=sampling_opts,
    log:
        join(RUN, "logs/it{it}/sampling.log"),
    benchmark:
        join(RUN, "benchmarks/it{it}/sampling.tsv")
    conda:
        "../workflow/envs/omlrelion.yaml"
    script:
        "../scripts/sampling.py"


# A run from a reference map (datasets.<name>.reference, with a pose search): its starting state
# in start/ (iteration 0), from which iteration 1 searches like every later iteration.
rule initial_model:
    input:
        store=STORE,
        reference=lambda wc: config["datasets"][wc.dataset]["reference"],
    output:
        model=join(START, "model.json"),
        sampling=join(START, "sampling.json"),
        volumes=[join(START, "half1.h5"), join(START, "half2.h5")],
        poses=expand(join(START, "poses_half{half}_shard{shard}.h5"), half=(1, 2), shard=shards(), allow_missing=True),
    params:
        opts=initial_opts,
    log:
        join(RUN, "logs/start/initial_model.log"),
    benchmark:
        join(RUN, "benchmarks/start/initial_model.tsv")
    conda:
        "../workflow/envs/omlrelion.yaml"
    script:
        "../scripts/initial_model.py"
