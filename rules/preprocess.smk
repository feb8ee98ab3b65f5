# The built-in demo data (a simulated phantom) and STAR + stacks -> HDF5 particle store.


rule simulate:
    output:
        star=SIMULATED,
        stack=join(DATA, "input/particles.mrcs"),
        phantom=PHANTOM,
    params:
        opts=simulate_opts,
    log:
        join(DATA, "logs/simulate.log"),
    benchmark:
        join(DATA, "benchmarks/simulate.tsv")
    conda:
        "../workflow/envs/omlrelion.yaml"
    script:
        "../scripts/simulate.py"


rule preprocess:
    input:
        star=input_star,
    output:
        store=STORE,
    params:
        opts=preprocess_opts,
    log:
        join(DATA, "logs/preprocess.log"),
    benchmark:
        join(DATA, "benchmarks/preprocess.tsv")
    conda:
        "../workflow/envs/omlrelion.yaml"
    script:
        "../scripts/preprocess.py"
