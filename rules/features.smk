# Features: DINOv2 patch features of the renders averaged onto the voxels (TRELLIS's
# extract_feature.py recipe). Settings and helpers are in rules/common.smk;
# the logic in slatflow/features.py.


register_stage_target("features", out(f"features/{FEATURE_MODEL}/{{sha256}}.npz"))

# The renders and voxels, and with the visibility mean the mesh it rasterizes: patterns,
# fixed at parse time (a function would cost Snakemake a call and a signature per job).
FEATURE_INPUTS = {
    "transforms": out("renders/{sha256}/transforms.json"),
    "voxels": out("voxels/{sha256}.ply"),
    **({"mesh": out("renders/{sha256}/mesh.ply")} if FEATURES.visibility else {}),
}


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
        gpu_slot=GPU_SLOT.features,
    params:
        settings=FEATURES.output_settings(),
    script:
        "../scripts/extract_features.py"


rule features:
    input:
        get_stage_targets("features"),
        out("metadata.csv"),
