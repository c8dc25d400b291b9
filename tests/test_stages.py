"""The stage table (slatflow.stages) against the rule files and the registries that read it."""

from __future__ import annotations

import re

import pytest

from conftest import REPO
from slatflow import stages
from slatflow.stages import STAGE_BY_NAME, STAGES, stage_of_column, stage_of_folder, upstream_targets

RULE_FILES = [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]
RULE_LINE = re.compile(r"^(?:rule|checkpoint) (\w+):", re.MULTILINE)
# register_stage_target("voxels", out("voxels/{sha256}.ply")) -> ("voxels", 'voxels/{sha256}.ply')
REGISTRATION = re.compile(r'^register_stage_target\("(\w+)"(?:, (?:out\(f?"([^"]*)"\)|(\w+)))?\)', re.MULTILINE)


def _sources() -> str:
    return "\n".join(path.read_text() for path in RULE_FILES)


def test_every_rule_of_the_workflow_is_in_the_table_and_every_rule_of_the_table_exists():
    written = set(RULE_LINE.findall(_sources()))
    declared = stages.workflow_rules()
    assert written - declared == set(), "rules the stage table does not declare"
    assert declared - written == set(), "rules the stage table declares that no rule file has"


def test_the_table_names_each_rule_once():
    rules = [rule for stage in STAGES for rule in stage.rules]
    assert len(rules) == len(set(rules))
    assert len(STAGE_BY_NAME) == len(STAGES)


def test_the_rule_files_register_exactly_the_tables_stage_targets_with_its_folders():
    registered = {name: (pattern, function) for name, pattern, function in REGISTRATION.findall(_sources())}
    assert set(registered) == {s.target for s in STAGES if s.target and s.folder}
    for name, (pattern, function) in registered.items():
        stage = stages.STAGE_BY_TARGET[name]
        if not pattern:
            continue  # downloads' files come from the manifest, the report has none
        folder, _, rest = pattern.partition("/")
        assert folder == stage.folder, name
        if stage.suffix:  # a per-asset file: [<model>/]<sha256><suffix>
            assert re.fullmatch(r"(\{\w+\}/)?\{\{?sha256\}\}?" + re.escape(stage.suffix), rest), (name, rest)
            assert ("/" in rest.split("sha256")[0]) == stage.per_model, name


def test_every_stage_comes_after_the_stages_it_is_built_from():
    """metadata.csv shows an asset's earliest failure as its cause: the order must be the DAG's."""
    seen: set[str] = set()
    for stage in STAGES:
        assert set(stage.upstream) <= seen, f"{stage.name} precedes one of {stage.upstream}"
        seen.add(stage.name)


def test_upstream_targets_are_the_targets_of_the_upstream_stages():
    assert upstream_targets(stages.QUALITY) == ("renders", "voxels", "meshes")
    assert upstream_targets(stages.RENDER) == ("downloads",)
    assert upstream_targets(stages.DOWNLOAD) == ()


@pytest.mark.parametrize(
    "column, stage",
    [
        ("rendered", "render"),
        ("cond_rendered", "render_cond"),
        ("voxelized", "voxelize"),
        ("num_voxels", "voxelize"),
        ("feature_dinov2_vitl14_reg", "features"),
        ("ss_latent_ss_enc_conv3d_16l8_fp16", "ss_latent"),
        ("latent_dinov2_vitl14_reg_slat_enc_swin8_B_64l8_fp16", "slat_latent"),
        ("aesthetic_score", None),
    ],
)
def test_a_metadata_column_maps_to_the_stage_that_quarantines_its_assets(column, stage):
    assert stage_of_column(column) == stage


def test_folders_map_to_their_stages_as_the_read_errors_name_them():
    assert stage_of_folder() == {
        "renders": "render", "renders_cond": "render_cond", "voxels": "voxelize", "features": "features",
        "ss_latents": "ss_latent", "latents": "slat_latent", "meshes": "meshes", "sdf": "sdf", "quality": "quality",
    }  # fmt: skip


def test_a_switched_stage_leaves_all_only_when_its_switch_is_off():
    assert stages.SDF.in_all_for({"meshes": {"sdf": {"enabled": True}}})
    assert not stages.SDF.in_all_for({"meshes": {"sdf": {"enabled": False}}})
    assert not stages.RENDER_COND.in_all_for({})
    assert stages.VOXELIZE.in_all_for({})


def test_worker_services_are_the_stage_tables():
    from slatflow.worker import SERVICES

    assert SERVICES == {
        "raster": "slatflow.raster:worker_service",
        "features": "slatflow.features:worker_service",
        "ss_latent": "slatflow.latents:ss_worker_service",
        "slat_latent": "slatflow.latents:slat_worker_service",
    }
    for service, stage in (("features", "features"), ("ss_latent", "ss_latent"), ("slat_latent", "slat_latent")):
        assert STAGE_BY_NAME[stage].service[0] == service  # a model job's stage is its worker service


def test_the_readme_draws_the_table_as_it_is():
    assert stages.markdown_table() in (REPO / "README.md").read_text()
