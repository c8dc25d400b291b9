# Voxelize: renders/<sha256>/mesh.ply -> voxels/<sha256>.ply, the surface voxels Open3D >= 0.18
# finds (TRELLIS's voxelizer), without Open3D; the logic is in slatflow/voxelize.py.
# metadata.csv's num_voxels is the voxel file's vertex count.


register_stage_target("voxels", out("voxels/{sha256}.ply"))


rule voxelize_mesh:
    input:
        out("renders/{sha256}/mesh.ply"),
    output:
        out("voxels/{sha256}.ply"),
    log:
        out("logs/voxelize_mesh/{sha256}.log"),
    benchmark:
        out("benchmarks/voxelize_mesh/{sha256}.tsv")
    conda:
        "../envs/base.yaml"
    threads: 1  # a single-threaded kernel (0.1 s for 1M triangles); assets run side by side
    params:
        resolution=config["voxelize"]["resolution"],
    script:
        "../scripts/voxelize_mesh.py"


rule voxels:
    input:
        get_stage_targets("voxels"),
        out("metadata.csv"),
