# Per iteration: gold-standard FSC and schedule (a checkpoint, read when iterating until
# convergence), the half maps; after the final iteration the unfiltered halves and the joined map.


checkpoint model_update:
    input:
        unpack(model_inputs),
    output:
        model=join(IT, "model.json"),
    params:
        opts=model_opts,
    log:
        join(RUN, "logs/it{it}/model_update.log"),
    benchmark:
        join(RUN, "benchmarks/it{it}/model_update.tsv")
    conda:
        "../workflow/envs/omlrelion.yaml"
    script:
        "../scripts/model_update.py"


rule reconstruct_half:
    input:
        unpack(half_map_inputs),
        sums=join(IT, "sums_half{half}.h5"),
        model=join(IT, "model.json"),
    output:
        volume=join(IT, "half{half}.h5"),
        mrc=join(IT, "run_it{it}_half{half}_class001.mrc"),
        model_star=join(IT, "run_it{it}_half{half}_model.star"),
    params:
        opts=half_map_opts,
    log:
        join(RUN, "logs/it{it}/reconstruct_half{half}.log"),
    benchmark:
        join(RUN, "benchmarks/it{it}/reconstruct_half{half}.tsv")
    conda:
        "../workflow/envs/omlrelion.yaml"
    script:
        "../scripts/reconstruct_half.py"


rule reconstruct_unfil:
    input:
        unpack(final_inputs),
    output:
        mrc=join(FINAL, "run_half{half}_class001_unfil.mrc"),
    params:
        opts=reconstruct_opts,
        it=final_it,
    log:
        join(RUN, "logs/final/reconstruct_unfil_half{half}.log"),
    benchmark:
        join(RUN, "benchmarks/final/reconstruct_unfil_half{half}.tsv")
    conda:
        "../workflow/envs/omlrelion.yaml"
    script:
        "../scripts/reconstruct_unfil.py"


rule reconstruct_joined:
    input:
        unpack(final_inputs),
    output:
        mrc=join(FINAL, "run_class001.mrc"),
        model_star=join(FINAL, "run_model.star"),
    params:
        opts=reconstruct_opts,
        it=final_it,
    log:
        join(RUN, "logs/final/reconstruct_joined.log"),
    benchmark:
        join(RUN, "benchmarks/final/reconstruct_joined.tsv")
    conda:
        "../workflow/envs/omlrelion.yaml"
    script:
        "../scripts/reconstruct_joined.py"
