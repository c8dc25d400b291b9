"""Fixtures of the render tests: assets in the formats the sample lacks, fast settings, and the
check that a render's alpha masks agree with its mesh.ply through transforms.json's cameras."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import numpy as np

from slatflow.cameras import project_points
from slatflow.io import read_ply_points
from slatflow.render import RenderSettings

REPO = Path(__file__).resolve().parents[1]
SAMPLE_ASSETS = REPO / "sample" / "assets"

# one file per format of the bundled sample (sample/README.md)
SAMPLE_FILES = {
    "glb": "torus.glb",
    "gltf": "lantern_gltf/lantern.gltf",
    "obj": "crate_obj/crate.obj",
    "fbx": "suzanne_fbx/suzanne.fbx",
    "ply": "rock.ply",
    "stl": "chair.stl",
    "blend": "mushroom.blend",
    "usdz": "logo.usdz",
}

# the formats the sample does not cover, exported by bpy from one off-centre, rotated shape,
# and a .blend whose own render settings would move pixels (a render region, 2:1 pixels)
EXTRA_FILES = {
    "usda": "shapes.usda",
    "usdc": "shapes.usdc",
    "abc": "shapes.abc",
    "dae": "shapes.dae",
    "blend_own_settings": "shapes.blend",
}
EXTRA_FORMATS = tuple(EXTRA_FILES)

_EXPORT_SCRIPT = textwrap.dedent(
    """
    import sys
    import bpy

    folder = sys.argv[1]
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.mesh.primitive_monkey_add(size=3.0, location=(5.0, -2.0, 7.0), rotation=(0.4, 0.2, 1.0))
    bpy.ops.mesh.primitive_cone_add(radius1=1.0, depth=2.0, location=(7.5, -2.0, 7.0))
    bpy.ops.wm.usd_export(filepath=f"{folder}/shapes.usda")
    bpy.ops.wm.usd_export(filepath=f"{folder}/shapes.usdc")
    bpy.ops.wm.alembic_export(filepath=f"{folder}/shapes.abc")
    bpy.ops.wm.collada_export(filepath=f"{folder}/shapes.dae")
    render = bpy.context.scene.render
    render.use_border, render.border_min_x, render.border_max_x = True, 0.6, 0.9
    render.pixel_aspect_x = 2.0
    bpy.ops.wm.save_as_mainfile(filepath=f"{folder}/shapes.blend")
    """
)


def blender_env(home: Path) -> dict:
    env = dict(os.environ)
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"))
    return env


def make_extra_format_assets(folder: Path) -> dict[str, Path]:
    """EXTRA_FILES: a monkey and a cone written by bpy in a subprocess."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-c", _EXPORT_SCRIPT, str(folder)],
        check=True, capture_output=True, timeout=300, env=blender_env(folder),
    )
    return {name: folder / file_name for name, file_name in EXTRA_FILES.items()}


def fast_settings(**overrides) -> RenderSettings:
    """Light settings for tests: few small views, few samples, no denoiser."""
    values = dict(num_views=6, resolution=96, samples=4, denoise=False, adaptive_threshold=0.0,
                  threads=2, timeout_s=240)
    values.update(overrides)
    return RenderSettings(**values)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_alpha(path: Path) -> np.ndarray:
    """uint8 (H, W): the PNG's alpha channel."""
    from PIL import Image

    image = Image.open(path)
    assert image.mode == "RGBA", f"{path} is {image.mode}, expected RGBA"
    return np.asarray(image)[..., 3]


class ViewAgreement(NamedTuple):
    on_alpha: float  # fraction of in-image vertices on a pixel with alpha > 0
    bbox_error_px: float  # largest difference between the mask's and the projection's bbox edges
    in_image: int  # vertices that project into the image


def alpha_geometry_agreement(render_dir: Path, vertices: np.ndarray | None = None) -> list[ViewAgreement]:
    """Project mesh.ply's vertices with each frame's camera (the contract's camera math) and
    compare with the PNG's alpha mask."""
    transforms = json.loads((render_dir / "transforms.json").read_text())
    if vertices is None:
        vertices = read_ply_points(render_dir / "mesh.ply")
    agreements = []
    for frame in transforms["frames"]:
        alpha = read_alpha(render_dir / frame["file_path"])
        height, width = alpha.shape
        uv, depth = project_points(vertices, np.array(frame["transform_matrix"]), frame["camera_angle_x"])
        px = uv * np.array([width, height])  # (N, 2) pixel coordinates, x right, y down
        inside = (depth > 0) & np.all((px >= 0) & (px < [width, height]), axis=1)
        cols, rows = px[inside, 0].astype(int), px[inside, 1].astype(int)
        on_alpha = float(np.mean(alpha[rows, cols] > 0)) if inside.any() else 0.0
        mask_rows, mask_cols = np.nonzero(alpha)
        if len(mask_rows) == 0:
            agreements.append(ViewAgreement(on_alpha, float("inf"), int(inside.sum())))
            continue
        # pixel i spans [i, i+1): the mask's extent in continuous image coordinates
        mask_box = np.array([mask_cols.min(), mask_rows.min(), mask_cols.max() + 1, mask_rows.max() + 1])
        front = px[depth > 0]
        proj_box = np.concatenate([front.min(axis=0), front.max(axis=0)])
        proj_box = np.clip(proj_box, 0, [width, height, width, height])
        agreements.append(ViewAgreement(on_alpha, float(np.abs(mask_box - proj_box).max()), int(inside.sum())))
    return agreements
