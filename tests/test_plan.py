"""slatflow.plan: the stage targets' files, what a command line asks for, metadata.csv's
inputs, the GPU share of each job, and the files ingest reads."""

from __future__ import annotations

import os

import pytest

from slatflow import plan
from slatflow.plan import GPU_SLOTS, GpuSlots, StageTargets

SHAS = ["a" * 64, "b" * 64]
CONFIG = {"meshes": {"sdf": {"enabled": True}}}


def sample_targets(config=CONFIG) -> StageTargets:
    """The stage targets as the rule files register them, with short patterns."""
    targets = StageTargets(config)
    targets.register("downloads", lambda shas: [f"src/{sha}.glb" for sha in shas])
    targets.register("renders", "renders/{sha256}/transforms.json")
    targets.register("renders_cond", "renders_cond/{sha256}/transforms.json")
    targets.register("voxels", "voxels/{sha256}.ply")
    targets.register("meshes", "meshes/{sha256}.ply")
    targets.register("sdf", "sdf/{sha256}.npz")
    targets.register("quality", "quality/{sha256}.json")
    targets.register("report")
    targets.register("features", "features/m/{sha256}.npz")
    targets.register("ss_latents", "ss_latents/e/{sha256}.npz")
    targets.register("latents", "latents/m_e/{sha256}.npz")
    targets.register("latent_stats", "latents/m_e/stats.json")
    return targets


def test_a_target_the_stage_table_lacks_cannot_be_registered():
    with pytest.raises(KeyError):
        StageTargets(CONFIG).register("voxelz", "voxels/{sha256}.ply")


def test_files_of_patterns_and_of_functions():
    targets = sample_targets()
    assert targets.files("voxels", SHAS) == [f"voxels/{sha}.ply" for sha in SHAS]
    assert targets.files("downloads", SHAS) == [f"src/{sha}.glb" for sha in SHAS]
    assert targets.files("report", SHAS) == []
    assert targets.files("latent_stats", SHAS) == ["latents/m_e/stats.json"] * 2


def test_all_leaves_out_conditioning_views_the_report_and_sdf_when_switched_off():
    every = set(sample_targets().all_files(SHAS[:1]))
    assert f"sdf/{SHAS[0]}.npz" in every and f"voxels/{SHAS[0]}.ply" in every
    assert not any(f.startswith("renders_cond/") for f in every)
    without_sdf = set(sample_targets({"meshes": {"sdf": {"enabled": False}}}).all_files(SHAS[:1]))
    assert every - without_sdf == {f"sdf/{SHAS[0]}.npz"}


def test_requested_targets_of_a_command_line():
    targets = sample_targets()
    in_all = {name for name, t in targets.targets.items() if t.in_all}
    assert targets.requested([]) == in_all == targets.requested(["all"])
    assert targets.requested(["features"]) == {"features"}
    assert targets.requested(["report"]) == {"report", "quality"}  # the report's own inputs
    assert targets.requested(["metadata"]) == set()


def test_upstream_targets_are_transitive_and_leave_out_the_requested():
    targets = sample_targets()
    assert targets.upstream({"latents"}) == {"features", "renders", "voxels", "downloads"}
    assert targets.upstream({"quality", "meshes"}) == {"renders", "voxels", "downloads"}


def test_metadata_inputs_are_requested_files_and_other_stages_files_on_disk():
    targets = sample_targets()
    on_disk = {f"renders/{SHAS[0]}/transforms.json", f"meshes/{SHAS[1]}.ply", "latents/m_e/stats.json"}
    inputs = targets.metadata_inputs(["voxels"], SHAS, exists=on_disk.__contains__)
    # voxels requested: all of its files; renders and downloads are upstream: none of theirs,
    # even on disk; meshes and latent stats untouched by this run: what is there, once each
    assert inputs == [f"voxels/{sha}.ply" for sha in SHAS] + [f"meshes/{SHAS[1]}.ply", "latents/m_e/stats.json"]


def test_gpu_slots():
    slots = GpuSlots.plan("CYCLES", "CPU", "cpu", "cpu", workers_enabled=True)
    assert slots == GpuSlots(render=0, features=0, latents=0)
    slots = GpuSlots.plan("CYCLES", "OPTIX", "cuda:1", "cuda", workers_enabled=True)
    assert slots == GpuSlots(render=GPU_SLOTS, features=1, latents=1)
    slots = GpuSlots.plan("BLENDER_EEVEE_NEXT", "CPU", "cuda", "cpu", workers_enabled=False)
    assert slots == GpuSlots(render=GPU_SLOTS, features=GPU_SLOTS, latents=0)
    assert GpuSlots.plan("RASTER", "CUDA", "cpu", "cpu", workers_enabled=True).render == 0


def test_auto_means_the_gpu_where_nvidia_smi_is(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not plan.runs_on_gpu("auto")
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\n")
    smi.chmod(0o755)
    assert plan.runs_on_gpu("auto") and plan.runs_on_gpu("cuda:0") and not plan.runs_on_gpu("cpu")


def test_ingest_inputs_per_source_type(tmp_path):
    assert plan.ingest_inputs({"type": "local", "path": "/x"}, "OUT") == {}
    assert plan.ingest_inputs({"type": "csv", "path": "/x.csv"}, "OUT") == {"csv": "/x.csv"}
    downloaded = plan.ingest_inputs({"type": "trellis500k", "subsets": ["ObjaverseXL_sketchfab", "ABO"]}, "OUT")
    assert downloaded["subset_csvs"] == ["OUT/raw/trellis500k/ObjaverseXL_sketchfab.csv", "OUT/raw/trellis500k/ABO.csv"]
    assert downloaded["object_paths"].startswith("OUT/raw/ObjaverseXL_sketchfab/")
    local = plan.ingest_inputs({"type": "trellis500k", "subsets": ["ABO"], "csv_dir": "/csvs"}, "OUT")
    assert local == {"subset_csvs": ["/csvs/ABO.csv"]}


def test_selected_assets_are_read_again_when_the_manifest_changes(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"sha256\n{SHAS[0]}\n")
    assert plan.selected_sha256s(str(manifest), str(tmp_path), "0/1", False) == [SHAS[0]]
    manifest.write_text(f"sha256\n{SHAS[0]}\n{SHAS[1]}\n")
    os.utime(manifest, ns=(1, 1))  # a new mtime, as a rewrite has
    assert plan.selected_sha256s(str(manifest), str(tmp_path), "0/1", False) == SHAS


def test_rerun_params_leave_out_what_changes_no_output():
    config = {"meshes": {"sdf": {"enabled": True, "num_points": 5}}, "quality": {"num_previews": 6, "seed": 1}}
    assert plan.sdf_params(config) == {"num_points": 5}
    assert plan.quality_params(config) == {"seed": 1}
