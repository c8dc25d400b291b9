"""The run's plan, as the rule files ask for it: the files ingest reads, the assets of this
invocation, each stage target's files, which targets a command line asks for, what
metadata.csv is derived from, each job's share of a GPU, and what re-runs a job.

rules/common.smk keeps the path plumbing (output root, manifest, input functions) and asks
this module; it holds no Snakemake objects, so it is tested without a workflow
(tests/test_plan.py). Which stages exist, what `all` holds and what each is built from are
the stage table's (slatflow.stages).
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

from slatflow.stages import ALL_TARGET, STAGE_BY_NAME, STAGE_BY_TARGET, upstream_targets, with_upstream

# A target's file pattern with {sha256}, or a function of the assets' sha256s that returns
# one file per asset (downloads' files come from the manifest).
Pattern = Union[str, Callable[[Sequence[str]], list[str]]]

# A GPU is GPU_SLOTS of the gpu_slot resource (profiles/default: gpu_slot=8). A render takes
# all of them; a model job handed to a worker takes one, so several run side by side and
# their worker reads, runs and writes different assets at once (slatflow/worker.py).
GPU_SLOTS = 8


def ingest_inputs(source: dict, out_dir: str) -> dict[str, str | list[str]]:
    """The files ingest reads: a csv source's CSV, or TRELLIS-500K's subset CSVs (local
    copies in source.csv_dir, else downloaded to OUT/raw/trellis500k/) and, for Sketchfab,
    objaverse's object paths; a local source's folder is no file (its fingerprint re-runs it).
    """
    from slatflow.trellis500k import OBJECT_PATHS_FILE, SKETCHFAB

    if source["type"] == "csv":
        return {"csv": source["path"]}
    if source["type"] != "trellis500k":
        return {}
    folder = source.get("csv_dir") or f"{out_dir}/raw/trellis500k"
    inputs: dict[str, str | list[str]] = {"subset_csvs": [f"{folder}/{subset}.csv" for subset in source["subsets"]]}
    if SKETCHFAB in source["subsets"]:
        inputs["object_paths"] = f"{out_dir}/raw/{SKETCHFAB}/{OBJECT_PATHS_FILE}"
    return inputs


def selected_sha256s(manifest: str, out_dir: str, shard: str, retry_failed: bool) -> list[str]:
    """This invocation's assets (its shard, less quarantined ones), read once per process and
    manifest version: Snakemake asks for them once per target and job."""
    return _selected_sha256s(manifest, os.stat(manifest).st_mtime_ns, out_dir, shard, retry_failed)


@functools.cache
def _selected_sha256s(manifest: str, mtime_ns: int, out_dir: str, shard: str, retry_failed: bool) -> list[str]:
    from slatflow.ingest import select_assets

    return select_assets(manifest, out_dir, shard, retry_failed)


def manifest_rows(manifest: str):
    """The manifest's `ManifestRows` (sha256 -> planning columns), read once per version."""
    return _manifest_rows(manifest, os.stat(manifest).st_mtime_ns)


@functools.cache
def _manifest_rows(manifest: str, mtime_ns: int):
    from slatflow.manifest import ManifestRows

    return ManifestRows(manifest)


@dataclass(frozen=True)
class StageTarget:
    """A stage target of the workflow.

    Attributes:
        patterns: its per-asset files; none for a target of no files of its own (the report).
        in_all: part of `all` under this config.
    """

    patterns: tuple[Pattern, ...]
    in_all: bool

    def files(self, sha256s: Sequence[str]) -> list[str]:
        """Its files for these assets, pattern by pattern."""
        files: list[str] = []
        for pattern in self.patterns:
            if callable(pattern):
                files.extend(pattern(sha256s))
            else:
                files.extend(pattern.format(sha256=sha) for sha in sha256s)
        return files


class StageTargets:
    """The stage targets the rule files register, in their order (name -> StageTarget)."""

    def __init__(self, config: dict):
        self.config = config
        self.targets: dict[str, StageTarget] = {}

    def register(self, name: str, *patterns: Pattern) -> None:
        """Add the stage table's target `name` with its per-asset file patterns.

        Raises:
            KeyError: `name` is no target of the stage table.
        """
        stage = STAGE_BY_TARGET[name]
        self.targets[name] = StageTarget(patterns, stage.in_all_for(self.config))

    def files(self, name: str, sha256s: Sequence[str]) -> list[str]:
        return self.targets[name].files(sha256s)

    def all_files(self, sha256s: Sequence[str]) -> list[str]:
        """The files of every target in `all`."""
        return [f for name, target in self.targets.items() if target.in_all for f in target.files(sha256s)]

    def requested(self, named: Iterable[str]) -> set[str]:
        """The stage targets a command line's targets ask for (all of `all`'s when it names
        none); a target of no files of its own (the report) asks for those it is built after."""
        named = set(named)
        if not named or ALL_TARGET in named:
            return {name for name, target in self.targets.items() if target.in_all}
        requested = named & self.targets.keys()
        for name in list(requested):
            if not self.targets[name].patterns:
                requested |= set(upstream_targets(STAGE_BY_TARGET[name]))
        return requested

    def upstream(self, requested: Iterable[str]) -> set[str]:
        """The targets the requested ones are built after, transitively (not themselves)."""
        requested = set(requested)
        stages = with_upstream(STAGE_BY_TARGET[name].name for name in requested)
        return ({STAGE_BY_NAME[stage].target for stage in stages} & self.targets.keys()) - requested

    def metadata_inputs(
        self, named: Iterable[str], sha256s: Sequence[str], exists: Callable[[str], bool] = os.path.exists
    ) -> list[str]:
        """What metadata.csv is derived from: the requested targets' files (so it is built
        after them), and the files already on disk of every target this run does not touch
        (so it changes with them). Upstream targets are left out: this run makes or keeps them
        before the requested outputs, and listing them would make it re-render assets whose
        renders were deleted, or change this list between the first run and the next.

        Returns:
            each file once (latent_stats' file has no {sha256}), in the targets' order.
        """
        requested = self.requested(named)
        upstream = self.upstream(requested)
        files = []
        for name, target in self.targets.items():
            if name in upstream:
                continue
            files.extend(f for f in target.files(sha256s) if name in requested or exists(f))
        return list(dict.fromkeys(files))


def runs_on_gpu(device: str) -> bool:
    """Whether a model stage's `device` setting puts it on a GPU: `cuda[:N]`, or `auto` on a
    machine with NVIDIA's driver. Asked where the workflow is planned (the submitting host
    under SLURM, whose profile gives GPU rules their GPU itself)."""
    return device.startswith("cuda") or (device == "auto" and shutil.which("nvidia-smi") is not None)


@dataclass(frozen=True)
class GpuSlots:
    """Each GPU rule's `gpu_slot` resource: GPU_SLOTS for the whole GPU, 0 for none.

    Attributes:
        render: Cycles on a GPU or EEVEE (OpenGL) take the GPU: one render at a time.
            Raster jobs take none: their Blender export is CPU work, and one raster worker
            per machine owns the GL context.
        features: a features job whose model runs on the GPU.
        latents: a latent encoder job whose model runs on the GPU.
    """

    render: int
    features: int
    latents: int

    @classmethod
    def plan(cls, render_engine: str, render_device: str, features_device: str, latents_device: str,
             workers_enabled: bool) -> "GpuSlots":
        """The slots of this config's jobs.

        Args:
            workers_enabled: model jobs hand their asset to a worker, so several share the
                GPU (one slot each); without workers each job loads the model (the whole GPU).
        """
        model_job = 1 if workers_enabled else GPU_SLOTS
        render_gpu = render_engine == "BLENDER_EEVEE_NEXT" or (render_engine == "CYCLES" and render_device != "CPU")
        return cls(
            render=GPU_SLOTS * int(render_gpu),
            features=model_job * int(runs_on_gpu(features_device)),
            latents=model_job * int(runs_on_gpu(latents_device)),
        )


# A rule's params are what re-runs its jobs on a change (Snakemake's params trigger); the job
# itself builds its settings from the config. Left out of them: settings that change no output.


def sdf_params(config: dict) -> dict:
    """What re-samples an asset's SDF: every sampling setting (each changes the samples); not
    the switch that puts the stage in `all`."""
    return {k: v for k, v in config["meshes"]["sdf"].items() if k != "enabled"}


def quality_params(config: dict) -> dict:
    """What re-checks an asset: the metric settings and thresholds; not the report's preview
    count."""
    return {k: v for k, v in config["quality"].items() if k != "num_previews"}
