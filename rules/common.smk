# Path plumbing shared by the rule files; the plan is slatflow/plan.py, the logic the library's.
# A job builds its settings from the config; a rule's params are what re-runs it on a change.
import os

from slatflow.config import check_voxel_grid
from slatflow.feature_settings import FeatureSettings, resolve_arch
from slatflow.latents import LatentSettings
from slatflow.metadata import refresh_output_state
from slatflow.plan import (
    GpuSlots,
    StageTargets,
    ingest_inputs,
    manifest_rows,
    quality_params,
    sdf_params,
    selected_sha256s,
)
from slatflow.render import CondSettings, RenderSettings
from slatflow.stages import RASTER_RULE_SUFFIX
from slatflow.trellis500k import (
    GITHUB,
    HF_SUBSETS,
    OBJECT_PATHS_FILE,
    SKETCHFAB,
    SUBSETS,
    AssetSource,
    DownloadSettings,
)
from slatflow.workflow import RUN_PROCESS_ENV, run_process_identity

OUT = os.path.normpath(config["output_dir"])

# Conda envs hold the dependencies; the library travels with the workflow, so a code
# change needs no env rebuild (jobs inherit this environment, remote ones re-parse it).
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        p for p in (workflow.basedir, os.environ.get("PYTHONPATH")) if p
    )
)
# The run's Snakemake process, for its jobs to exit with it (slatflow.workflow.exit_with_run).
os.environ.setdefault(RUN_PROCESS_ENV, run_process_identity())


wildcard_constraints:
    sha256="[0-9a-f]{64}",


def out(path):
    """A path under the output root."""
    return f"{OUT}/{path}"


DOWNLOAD = DownloadSettings.from_config(config["download"])
RENDER = RenderSettings.from_config(config["render"])
RENDER_COND = CondSettings.from_config(config["render_cond"])
FEATURES = FeatureSettings.from_config(config["features"])
LATENTS = LatentSettings.from_config(config["latents"])
LATENTS.check_feature_channels(resolve_arch(FEATURES.model).embed_dim, FEATURES.model)
GPU_SLOT = GpuSlots.plan(
    RENDER.engine,
    RENDER.device,
    FEATURES.device,
    LATENTS.device,
    config["workers"]["enabled"],
)
# The raster engine's rules have names of their own, so profiles/slurm can send them to GPUs.
RENDER_RULE_SUFFIX = RASTER_RULE_SUFFIX if RENDER.engine == "RASTER" else ""
# features/<name>/: the model, plus suffixes for non-TRELLIS settings (see the schema)
FEATURE_MODEL = FEATURES.feature_name
SS_LATENT_NAME = LATENTS.name("ss")
# latents/<feat>_<slat_enc>: TRELLIS's name, the features read, then the encoder
SLAT_LATENT_NAME = f"{FEATURE_MODEL}_{LATENTS.name('slat')}"
STAGE_TARGETS = StageTargets(config)
register_stage_target = STAGE_TARGETS.register


def get_ingest_inputs(wildcards):
    return ingest_inputs(config["source"], OUT)


# The checkpoint's output once Snakemake has it as created: its set of created outputs only
# grows, so the answer stands for the process (asking again costs 0.1 ms per job).
_MANIFEST = []


def manifest_path():
    """The manifest, once the ingest checkpoint has run (re-evaluates the DAG after it)."""
    if not _MANIFEST:
        _MANIFEST.append(checkpoints.ingest_manifest.get().output.manifest)
    return _MANIFEST[0]


def included_sha256s():
    """This invocation's assets (shard, less quarantined ones), read once per process."""
    check_voxel_grid(config, workflow.dag_settings.targets)  # no targets yet at parse
    shard, retry_failed = config["shard"], config["retry_failed"]
    return selected_sha256s(manifest_path(), OUT, shard, retry_failed)


def source_file(sha256):
    """The asset's source file (OUT/local_path; downloads' outputs for TRELLIS-500K)."""
    row = manifest_rows(manifest_path()).get(sha256)
    if row is None:
        raise WorkflowError(f"asset {sha256} is not in {manifest_path()}")
    # OUT/../src/a.glb -> src/a.glb
    return os.path.normpath(out(row["local_path"]))


def source_files(sha256s):
    return [source_file(sha) for sha in sha256s]


def get_source_file(wildcards):
    return source_file(wildcards.sha256)


def get_stage_targets(name):
    def inner(wildcards):
        return STAGE_TARGETS.files(name, included_sha256s())

    return inner


def get_all_targets(wildcards):
    return STAGE_TARGETS.all_files(included_sha256s())


def get_metadata_inputs(wildcards):
    """What metadata.csv is derived from (slatflow.plan.StageTargets.metadata_inputs), and
    the output state: a deleted output folder (which re-runs no stage) still rebuilds it.
    """
    named = workflow.dag_settings.targets
    files = STAGE_TARGETS.metadata_inputs(named, included_sha256s())
    return files + [refresh_output_state(OUT)]


def get_download_source(wildcards):
    row = manifest_rows(manifest_path()).get(wildcards.sha256)
    if row is None or row.get("subset") != wildcards.subset:
        raise WorkflowError(
            f"{out(f'raw/{wildcards.subset}/{wildcards.sha256}')} is no TRELLIS-500K asset of the manifest"
        )
    return AssetSource(
        row["sha256"], row["subset"], row["file_identifier"], row["source_ref"]
    ).as_params()


def download_slot(*subsets):
    """A resource of 1 for the downloads from these subsets' host (profiles cap them)."""
    return lambda wildcards: int(wildcards.subset in subsets)
