# Latents: TRELLIS's sparse-structure and SLat encoders (pure PyTorch), and SLat statistics.
# Names and helpers are in rules/common.smk; the logic in slatflow/latents.py.


register_stage_target("ss_latents", out(f"ss_latents/{SS_LATENT_NAME}/{{sha256}}.npz"))
register_stage_target("latents", out(f"latents/{SLAT_LATENT_NAME}/{{sha256}}.npz"))
register_stage_target("latent_stats", out(f"latents/{SLAT_LATENT_NAME}/stats.json"))


rule encode_ss_latent:
    input:
        out("voxels/{sha256}.ply"),
    output:
        out(f"ss_latents/{SS_LATENT_NAME}/{{sha256}}.npz"),
    log:
        out("logs/encode_ss_latent/{sha256}.log"),
    benchmark:
        out("benchmarks/encode_ss_latent/{sha256}.tsv")
    conda:
        "../envs/torch.yaml"
    threads: config["latents"]["threads"]  # torch CPU threads of a CPU run (schema)
    resources:
        gpu_slot=GPU_SLOT.latents,
    params:
        encoder=LATENTS.output_settings("ss"),
    script:
        "../scripts/encode_ss_latent.py"


rule encode_slat_latent:
    input:
        out(f"features/{FEATURE_MODEL}/{{sha256}}.npz"),
    output:
        out(f"latents/{SLAT_LATENT_NAME}/{{sha256}}.npz"),
    log:
        out("logs/encode_slat_latent/{sha256}.log"),
    benchmark:
        out("benchmarks/encode_slat_latent/{sha256}.tsv")
    conda:
        "../envs/torch.yaml"
    threads: config["latents"]["threads"]  # torch CPU threads of a CPU run (schema)
    resources:
        gpu_slot=GPU_SLOT.latents,
    params:
        encoder=LATENTS.output_settings("slat"),
    script:
        "../scripts/encode_slat_latent.py"


rule latent_stats:
    input:
        get_stage_targets("latents"),
    output:
        out(f"latents/{SLAT_LATENT_NAME}/stats.json"),
    log:
        out("logs/latent_stats.log"),
    localrule: True
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/latent_stats.py"


rule ss_latents:
    input:
        get_stage_targets("ss_latents"),
        out("metadata.csv"),


rule latents:
    input:
        get_stage_targets("latents"),
        out("metadata.csv"),
