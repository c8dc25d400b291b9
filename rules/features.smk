# Features: DINOv2 patch features of the renders averaged onto the voxels (TRELLIS's
# extract_feature.py recipe). Settings and helpers are in rules/common.smk (--- features);
# the logic in slatflow/features.py.


register_stage_target("features", out(f"features/{FEATURE_MODEL}/{{sha256}}.npz"))


rule extract_features:
    input:
        **FEATURE_INPUTS,
    output:
        out(f"features/{FEATURE_MODEL}/{{sha256}}.npz"),
    log:
        out(f"logs/extract_features/{FEATURE_MODEL}/{{sha256}}.log"),
    benchmark:
        out(f"benchmarks/extract_features/{FEATURE_MODEL}/{{sha256}}.tsv")
    conda:
        "../envs/torch.yaml"
    threads: config["features"]["threads"]  # PNG decode threads beside the model (schema)
    resources:
        gpu_slot=FEATURE_GPU_SLOT,
    params:
        settings=feature_params(),
    script:
        "../scripts/extract_features.py"


rule features:
    input:
        get_stage_targets("features"),
        out("metadata.csv"),
