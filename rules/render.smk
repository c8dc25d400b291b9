# Render: Blender views, mesh.ply and conditioning views of each asset (TRELLIS's settings).
# Settings and helpers are in rules/common.smk; the logic in slatflow/render.py.


register_stage_target("renders", out("renders/{sha256}/transforms.json"))
register_stage_target("renders_cond", out("renders_cond/{sha256}/transforms.json"))


rule render_views:
    name:
        f"render_views{RENDER_RULE_SUFFIX}"
    input:
        get_source_file,
    output:
        # transforms.json is written last: it means the PNGs and mesh.ply are complete
        transforms=out("renders/{sha256}/transforms.json"),
        mesh=out("renders/{sha256}/mesh.ply"),
    log:
        out("logs/render_views/{sha256}.log"),
    benchmark:
        out("benchmarks/render_views/{sha256}.tsv")
    conda:
        "../envs/blender.yaml"
    threads: config["render"]["threads"]  # Blender's render threads (schema: render.threads)
    resources:
        gpu_slot=GPU_SLOT.render,
    params:
        settings=RENDER.output_settings(),
    script:
        "../scripts/render_views.py"


rule render_cond:
    name:
        f"render_cond{RENDER_RULE_SUFFIX}"
    input:
        get_source_file,
    output:
        out("renders_cond/{sha256}/transforms.json"),
    log:
        out("logs/render_cond/{sha256}.log"),
    benchmark:
        out("benchmarks/render_cond/{sha256}.tsv")
    conda:
        "../envs/blender.yaml"
    threads: config["render"]["threads"]  # Blender's render threads (schema: render.threads)
    resources:
        gpu_slot=GPU_SLOT.render,
    params:
        settings={
            "render": RENDER.output_settings(),
            "cond": RENDER_COND.output_settings(),
        },
    script:
        "../scripts/render_cond.py"


rule renders:
    input:
        get_stage_targets("renders"),
        out("metadata.csv"),


rule renders_cond:
    input:
        get_stage_targets("renders_cond"),
        out("metadata.csv"),
