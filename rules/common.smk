# Path plumbing shared by the rule files; the logic lives in the slatflow package.
import collections
import functools
import os

from slatflow.ingest import select_assets
from slatflow.manifest import ManifestRows
from slatflow.metadata import refresh_output_state
from slatflow.stages import RASTER_RULE_SUFFIX, STAGE_BY_TARGET, upstream_targets
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


# The stage targets, as each stage's .smk registers them: name -> StageTarget.
StageTarget = collections.namedtuple("StageTarget", "patterns in_all after")
STAGE_TARGETS = {}


def register_stage_target(name, *patterns):
    """A target of per-asset outputs (patterns with {sha256}, or functions of a list of
    sha256s returning one file each); whether `all` has it, and the targets its outputs are
    built from (`after`, see get_metadata_inputs), are the stage table's (slatflow.stages).
    """
    stage = STAGE_BY_TARGET[name]
    STAGE_TARGETS[name] = StageTarget(
        patterns, stage.in_all_for(config), upstream_targets(stage)
    )


def target_files(target, sha256s):
    """A stage target's files for these assets."""
    files = []
    for pattern in target.patterns:
        if callable(pattern):
            files.extend(pattern(sha256s))
        else:
            files.extend(pattern.format(sha256=sha) for sha in sha256s)
    return files


def get_ingest_inputs(wildcards):
    """The files ingest reads: a csv source's CSV, or TRELLIS-500K's subset CSVs (local
    copies in source.path, else downloaded) and, for Sketchfab, objaverse's object paths.
    """
    source = config["source"]
    if source["type"] == "csv":
        return {"csv": source["path"]}
    if source["type"] != "trellis500k":
        return {}
    folder = source.get("csv_dir")
    inputs = {
        "subset_csvs": [
            f"{folder}/{subset}.csv" if folder else out(f"raw/trellis500k/{subset}.csv")
            for subset in source["subsets"]
        ]
    }
    if SKETCHFAB in source["subsets"]:
        inputs["object_paths"] = out(f"raw/{SKETCHFAB}/{OBJECT_PATHS_FILE}")
    return inputs


# The checkpoint's output once Snakemake has it as created: its set of created outputs only
# grows, so the answer stands for the process (asking again costs 0.1 ms per job).
_MANIFEST = []


def manifest_path():
    """The manifest, once the ingest checkpoint has run (re-evaluates the DAG after it)."""
    if not _MANIFEST:
        _MANIFEST.append(checkpoints.ingest_manifest.get().output.manifest)
    return _MANIFEST[0]


@functools.cache
def _selected_assets(manifest, mtime_ns):
    return select_assets(manifest, OUT, config["shard"], config["retry_failed"])


def included_sha256s():
    """This invocation's assets (shard, less quarantined ones), read once per process."""
    manifest = manifest_path()
    return _selected_assets(manifest, os.stat(manifest).st_mtime_ns)


@functools.cache
def _manifest_rows(manifest, mtime_ns):
    return ManifestRows(manifest)


def manifest_rows():
    """sha256 -> manifest row (planning columns), read once per process and manifest."""
    manifest = manifest_path()
    return _manifest_rows(manifest, os.stat(manifest).st_mtime_ns)


def source_file(sha256):
    """The asset's source file (OUT/local_path; downloads' outputs for TRELLIS-500K)."""
    row = manifest_rows().get(sha256)
    if row is None:
        raise WorkflowError(f"asset {sha256} is not in {manifest_path()}")
    # OUT/../src/a.glb -> src/a.glb
    return os.path.normpath(out(row["local_path"]))


def source_files(sha256s):
    return [source_file(sha) for sha in sha256s]


def get_source_file(wildcards):
    return source_file(wildcards.sha256)


def stage_target_files(name):
    return target_files(STAGE_TARGETS[name], included_sha256s())


def get_stage_targets(name):
    def inner(wildcards):
        return stage_target_files(name)

    return inner


def get_all_targets(wildcards):
    return [
        f
        for name, target in STAGE_TARGETS.items()
        if target.in_all
        for f in stage_target_files(name)
    ]


def requested_stage_targets():
    """The stage targets named on the command line (all of `all`'s when none is)."""
    named = set(workflow.dag_settings.targets)
    if not named or "all" in named:
        return {name for name, target in STAGE_TARGETS.items() if target.in_all}
    requested = named & STAGE_TARGETS.keys()
    for name in list(requested):
        if not STAGE_TARGETS[
            name
        ].patterns:  # a target of no files of its own (the report)
            requested |= set(
                STAGE_TARGETS[name].after
            )  # makes the targets it is built after
    return requested


def upstream_stage_targets(requested):
    """The targets the requested ones are built after, transitively."""
    upstream, pending = set(), list(requested)
    while pending:
        for name in STAGE_TARGETS[pending.pop()].after:
            if name not in upstream:
                upstream.add(name)
                pending.append(name)
    return upstream - requested


def get_metadata_inputs(wildcards):
    """What metadata.csv is derived from: the requested targets' outputs (so it is built
    after them), and the outputs already on disk of every stage this run does not touch
    (so it changes with them). Upstream targets are left out: this run makes or keeps them
    before the requested outputs, and listing them would make it re-render assets whose
    renders were deleted, or change this list between the first run and the next."""
    requested = requested_stage_targets()
    upstream = upstream_stage_targets(requested)
    files = []
    for name, target in STAGE_TARGETS.items():
        if name in upstream:
            continue
        for f in target_files(target, included_sha256s()):
            if name in requested or os.path.exists(f):
                files.append(f)
    # a deleted output folder (which re-runs no stage) still rebuilds metadata.csv
    files.append(refresh_output_state(OUT))
    return list(dict.fromkeys(files))  # once each (latent_stats' file has no {sha256})


# --- download
from slatflow.trellis500k import (
    HF_SUBSETS,
    GITHUB,
    OBJECT_PATHS_FILE,
    SKETCHFAB,
    SUBSETS,
    AssetSource,
    DownloadSettings,
)

DOWNLOAD = DownloadSettings.from_config(config["download"])


def get_download_source(wildcards):
    row = manifest_rows().get(wildcards.sha256)
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


# --- render
from slatflow.render import CondSettings, RenderSettings

RENDER = RenderSettings.from_config(config["render"])
RENDER_COND = CondSettings.from_config(config["render_cond"])
# A GPU is GPU_SLOTS of the gpu_slot resource (profiles/default: gpu_slot=8). A render
# takes all of them; a model job handed to a worker takes one, so several run side by side
# and their worker reads, runs and writes different assets at once (slatflow/worker.py).
GPU_SLOTS = 8
MODEL_JOB_SLOTS = 1 if config["workers"]["enabled"] else GPU_SLOTS
# Cycles on a GPU, or EEVEE (OpenGL): one GPU job at a time on a machine (profiles/default).
# Raster jobs run side by side: their Blender export is CPU work, and one raster worker per
# machine owns the GL context.
RENDER_GPU_SLOT = GPU_SLOTS * int(
    RENDER.engine == "BLENDER_EEVEE_NEXT"
    or (RENDER.engine == "CYCLES" and RENDER.device != "CPU")
)
# The raster engine's rules have names of their own, so profiles/slurm can send them to GPUs.
RENDER_RULE_SUFFIX = RASTER_RULE_SUFFIX if RENDER.engine == "RASTER" else ""


def render_params():
    """What re-renders an asset's views: the settings that change the images."""
    return RENDER.output_settings()


def render_cond_params():
    """What re-renders an asset's conditioning views."""
    return {"render": RENDER.output_settings(), "cond": RENDER_COND.output_settings()}


# --- features
import shutil

from slatflow.feature_settings import FeatureSettings

FEATURES = FeatureSettings.from_config(config["features"])
# features/<name>/: the model, plus suffixes for non-TRELLIS settings (see the schema)
FEATURE_MODEL = FEATURES.feature_name
# GPU slots of a features job when DINOv2 runs on the GPU (profiles/default).
FEATURE_GPU_SLOT = MODEL_JOB_SLOTS * int(
    FEATURES.device.startswith("cuda")
    or (FEATURES.device == "auto" and shutil.which("nvidia-smi") is not None)
)


def feature_params():
    """What re-runs an asset's features: the settings that change the file's values."""
    return FEATURES.output_settings()


# The renders and voxels, and with the visibility mean the mesh it rasterizes: patterns,
# fixed at parse time (a function would cost Snakemake a call and a signature per job).
FEATURE_INPUTS = {
    "transforms": out("renders/{sha256}/transforms.json"),
    "voxels": out("voxels/{sha256}.ply"),
    **({"mesh": out("renders/{sha256}/mesh.ply")} if FEATURES.visibility else {}),
}


# --- latents
from slatflow.feature_settings import resolve_arch
from slatflow.latents import LatentSettings

LATENTS = LatentSettings.from_config(config["latents"])
LATENTS.check_feature_channels(resolve_arch(FEATURES.model).embed_dim, FEATURES.model)
SS_LATENT_NAME = LATENTS.name("ss")
# latents/<feat>_<slat_enc>: TRELLIS's name, the features read, then the encoder
SLAT_LATENT_NAME = f"{FEATURE_MODEL}_{LATENTS.name('slat')}"
# GPU slots of a latent job when the encoders run on the GPU (profiles/default).
LATENT_GPU_SLOT = MODEL_JOB_SLOTS * int(
    LATENTS.device == "cuda"
    or (LATENTS.device == "auto" and shutil.which("nvidia-smi") is not None)
)


def latent_encoder_params(kind):
    """What re-runs an encoder's outputs: the checkpoint spec (two folders may hold files
    of one name), a random architecture, the torso precision; the name is in the path.
    """
    return {
        "spec": LATENTS.spec(kind),
        "random_args": LATENTS.random_args(kind),
        "precision": LATENTS.precision,
    }


# --- geometry
def sdf_sample_params():
    """What re-samples an asset's SDF: every sampling setting (each changes the samples)."""
    return {k: v for k, v in config["meshes"]["sdf"].items() if k != "enabled"}


def quality_params():
    """What re-checks an asset: the metric settings and thresholds (not the report's)."""
    return {k: v for k, v in config["quality"].items() if k != "num_previews"}
