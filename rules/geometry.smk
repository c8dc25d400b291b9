# Geometry: watertight meshes by the NeuS recipe (meshes/<sha256>.ply), optional SDF samples
# (sdf/<sha256>.npz), per-asset quality checks (quality/<sha256>.json) and the HTML report.
# Settings and helpers are in rules/common.smk; the logic in
# slatflow/geometry.py, slatflow/quality.py and slatflow/report.py.


register_stage_target("meshes", out("meshes/{sha256}.ply"))
# in `all` while meshes.sdf.enabled (the stage table's enabled_by)
register_stage_target("sdf", out("sdf/{sha256}.npz"))
register_stage_target("quality", out("quality/{sha256}.json"))
# No files of its own: asking for the report asks for the quality records it shows.
register_stage_target("report")


rule extract_mesh:
    input:
        out("renders/{sha256}/mesh.ply"),
    output:
        out("meshes/{sha256}.ply"),
    log:
        out("logs/extract_mesh/{sha256}.log"),
    benchmark:
        out("benchmarks/extract_mesh/{sha256}.tsv")
    conda:
        "../envs/geometry.yaml"
    threads: 2  # libigl's winding number and distances run on this many threads
    params:
        resolution=config["meshes"]["resolution"],
        method=config["meshes"]["marching_cubes"],
    script:
        "../scripts/extract_mesh.py"


rule sample_sdf:
    input:
        out("meshes/{sha256}.ply"),
    output:
        out("sdf/{sha256}.npz"),
    log:
        out("logs/sample_sdf/{sha256}.log"),
    benchmark:
        out("benchmarks/sample_sdf/{sha256}.tsv")
    conda:
        "../envs/geometry.yaml"
    threads: 2  # libigl's distances run on this many threads
    params:
        settings=sdf_params(config),
    script:
        "../scripts/sample_sdf.py"


rule quality_check:
    input:
        source=out("renders/{sha256}/mesh.ply"),
        renders=out("renders/{sha256}/transforms.json"),
        voxels=out("voxels/{sha256}.ply"),
        mesh=out("meshes/{sha256}.ply"),
    output:
        out("quality/{sha256}.json"),
    log:
        out("logs/quality_check/{sha256}.log"),
    benchmark:
        out("benchmarks/quality_check/{sha256}.tsv")
    conda:
        "../envs/geometry.yaml"
    threads: 2  # libigl's point-to-mesh distances run on this many threads
    params:
        settings=quality_params(config),
    script:
        "../scripts/quality_check.py"


rule quality_report:
    input:
        manifest=out("manifest.csv"),
        metadata=out("metadata.csv"),
        quality=get_stage_targets("quality"),
    output:
        out("report/quality_report.html"),
    log:
        out("logs/quality_report.log"),
    localrule: True
    conda:
        "../envs/geometry.yaml"
    params:
        num_previews=config["quality"]["num_previews"],
    script:
        "../scripts/quality_report.py"


rule meshes:
    input:
        get_stage_targets("meshes"),
        out("metadata.csv"),


rule sdf:
    input:
        get_stage_targets("sdf"),
        out("metadata.csv"),


rule quality:
    input:
        get_stage_targets("quality"),
        out("metadata.csv"),


rule report:
    input:
        out("report/quality_report.html"),
