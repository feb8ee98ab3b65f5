# relion_postprocess on the final unfiltered half maps; run_data.star and the angular distribution.


rule postprocess:
    input:
        half1=join(FINAL, "run_half1_class001_unfil.mrc"),
        half2=join(FINAL, "run_half2_class001_unfil.mrc"),
    output:
        map=join(POST, "postprocess.mrc"),
        masked_map=join(POST, "postprocess_masked.mrc"),
        star=join(POST, "postprocess.star"),
        json=join(POST, "postprocess.json"),
        fsc_png=report(join(POST, "postprocess_fsc.png"), category="FSC", labels={"run": "{dataset}/{pset}"}),
        guinier_png=report(join(POST, "postprocess_guinier.png"), category="Guinier", labels={"run": "{dataset}/{pset}"}),
        slices_png=report(join(POST, "central_slices.png"), category="Maps", labels={"run": "{dataset}/{pset}"}),
    params:
        opts=postprocess_opts,
    log:
        join(RUN, "logs/postprocess.log"),
    benchmark:
        join(RUN, "benchmarks/postprocess.tsv")
    conda:
        "../workflow/envs/omlrelion.yaml"
    script:
        "../scripts/postprocess.py"


rule export_particles:
    input:
        star=input_star,
        store=STORE,
        poses=final_poses,
    output:
        star=join(FINAL, "run_data.star"),
        png=report(join(FINAL, "angdist.png"), category="Angular distribution", labels={"run": "{dataset}/{pset}"}),
    params:
        it=final_it,
    log:
        join(RUN, "logs/final/export_particles.log"),
    benchmark:
        join(RUN, "benchmarks/final/export_particles.tsv")
    conda:
        "../workflow/envs/omlrelion.yaml"
    script:
        "../scripts/export_particles.py"
