# Per iteration and half set: add the shards' sums, Hermitian repair, point-group symmetry.


rule merge:
    input:
        shards=lambda wc: expand(
            join(IT, "sums_half{half}_shard{shard}.h5"),
            dataset=wc.dataset,
            pset=wc.pset,
            it=wc.it,
            half=wc.half,
            shard=shards(),
        ),
    output:
        sums=join(IT, "sums_half{half}.h5"),
    params:
        opts=merge_opts,
    log:
        join(RUN, "logs/it{it}/merge_half{half}.log"),
    benchmark:
        join(RUN, "benchmarks/it{it}/merge_half{half}.tsv")
    conda:
        "../workflow/envs/omlrelion.yaml"
    script:
        "../scripts/merge.py"
