"""The workflow end to end: targets, re-runs, config errors, sharding (real Snakemake runs)."""

from __future__ import annotations

import pandas as pd

from conftest import run_workflow


def local_config(tmp_path, **extra):
    return {"output_dir": str(tmp_path / "out"), "source": {"type": "local", "path": str(tmp_path / "assets")}, **extra}


def test_metadata_target_then_nothing_to_do(small_assets, tmp_path):
    config = local_config(tmp_path)
    first = run_workflow(config, ["metadata"], config_dir=tmp_path)
    assert first.returncode == 0, first.stderr
    table = pd.read_csv(tmp_path / "out" / "metadata.csv")
    assert sorted(table["file_identifier"]) == ["box.obj", "cone.stl", "nested/ball.glb"]
    assert list(table.columns[:9]) == [
        "sha256",
        "file_identifier",
        "aesthetic_score",
        "captions",
        "local_path",
        "rendered",
        "voxelized",
        "num_voxels",
        "cond_rendered",
    ]
    second = run_workflow(config, ["metadata"], config_dir=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "Nothing to be done" in second.stderr


def test_a_new_source_file_is_ingested_on_the_next_run(small_assets, tmp_path):
    config = local_config(tmp_path)
    assert run_workflow(config, ["metadata"], config_dir=tmp_path).returncode == 0
    (tmp_path / "assets" / "extra.stl").write_bytes(small_assets["cone.stl"].read_bytes() + b"\n")
    rerun = run_workflow(config, ["metadata"], config_dir=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert len(pd.read_csv(tmp_path / "out" / "metadata.csv")) == 4


def test_an_invalid_config_value_is_one_clear_line_before_any_job(small_assets, tmp_path):
    config = local_config(tmp_path, shard="3/2", retry_failed="yes")
    result = run_workflow(config, ["metadata"], "-n", config_dir=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "retry_failed: 'yes' is not of type 'boolean'" in output
    assert "shard: shard '3/2': need 0 <= i < n" in output
    assert "'$schema'" not in output, "the schema itself is not dumped"
    assert not (tmp_path / "out").exists()


def test_a_missing_source_folder_is_a_config_error(tmp_path):
    config = local_config(tmp_path)
    result = run_workflow(config, ["metadata"], "-n", config_dir=tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "source.path" in output and "is not a folder" in output


def test_user_config_is_merged_over_the_defaults(small_assets, tmp_path):
    config = local_config(tmp_path)
    result = run_workflow(config, ["metadata"], "-n", "--printshellcmds", config_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "out" / "manifest.csv") in result.stdout + result.stderr


FAST_RENDER = {"num_views": 2, "resolution": 32, "samples": 1, "denoise": False, "threads": 1}


def job_counts(output: str) -> dict[str, int]:
    """The dry-run's job table: rule -> count."""
    table, counts = False, {}
    for line in output.splitlines():
        if line.startswith("job "):
            table = True
        elif table and line.strip() and not line.startswith("-"):
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                break
            counts[parts[0]] = int(parts[1])
    return counts


def test_deleting_one_assets_output_reruns_that_asset_only(small_assets, tmp_path):
    config = local_config(tmp_path, render=FAST_RENDER)
    first = run_workflow(config, ["voxels"], config_dir=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    voxels = sorted((tmp_path / "out" / "voxels").glob("*.ply"))
    assert len(voxels) == 3
    unchanged = run_workflow(config, ["voxels"], "-n", config_dir=tmp_path)
    assert "Nothing to be done" in unchanged.stdout + unchanged.stderr

    voxels[0].unlink()
    plan = run_workflow(config, ["voxels"], "-n", config_dir=tmp_path)
    counts = job_counts(plan.stdout)
    assert counts == {"voxelize_mesh": 1, "metadata_aggregate": 1, "voxels": 1, "total": 3}, plan.stdout
    assert voxels[0].stem in plan.stdout
    rerun = run_workflow(config, ["voxels"], config_dir=tmp_path)
    assert rerun.returncode == 0 and voxels[0].exists()

    # Renders deleted to save space (they are the largest output) are not made again for a
    # downstream target whose outputs are there.
    import shutil

    shutil.rmtree(tmp_path / "out" / "renders")
    after_cleanup = run_workflow(config, ["voxels"], "-n", config_dir=tmp_path)
    assert "render_views" not in after_cleanup.stdout, after_cleanup.stdout


LIGHT_STAGES = {
    "render": FAST_RENDER,
    "features": {"model": "dinov2_vits14_reg", "weights": "random", "image_size": 56, "batch_size": 2, "threads": 1},
    "latents": {
        "ss_encoder": "random",
        "slat_encoder": "random",
        "random_ss_args": {"channels": [8, 16, 32], "num_res_blocks": 1, "num_res_blocks_middle": 1},
        "random_slat_args": {"in_channels": 384, "model_channels": 64, "num_blocks": 2, "num_heads": 4},
        "threads": 1,
    },
    "meshes": {"resolution": 32},
    "quality": {"num_samples": 2000, "num_previews": 2},
}


def test_all_then_nothing_to_do(small_assets, tmp_path):
    """Every stage on three tiny assets, then the same command plans no job at all."""
    config = local_config(tmp_path, **LIGHT_STAGES)
    first = run_workflow(config, [], config_dir=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "report" / "quality_report.html").is_file()
    table = pd.read_csv(out / "metadata.csv")
    assert len(table) == 3 and table["rendered"].all() and table["voxelized"].all()
    assert table.filter(like="latent_").iloc[:, 0].all() and table["mesh_fscore"].notna().all()
    second = run_workflow(config, [], "-n", config_dir=tmp_path)
    assert second.returncode == 0
    assert "Nothing to be done" in second.stdout + second.stderr, job_counts(second.stdout)
    # Another target summarizes another set of outputs: metadata and the report are rebuilt
    # (seconds), no asset's stage runs again.
    report = run_workflow(config, ["report"], "-n", config_dir=tmp_path)
    assert set(job_counts(report.stdout)) <= {"metadata_aggregate", "quality_report", "report", "total"}
