"""Build slatflow's bundled sample dataset: 8 small textured assets, one per input format.

Run from the repository root (bpy 4.5, numpy and PIL come with .venv):

    .venv/bin/python sample/make_sample.py [--out sample/assets]

Everything is generated here: shapes from Blender's primitives, textures from numpy with fixed
seeds; nothing is downloaded. ``--out`` is a generated folder: it is deleted and rebuilt.

Reproducibility: two runs write byte-identical files (same bpy, numpy and zlib builds), except
``mushroom.blend``: Blender writes the run-time memory address of every data block into a .blend
as its identifier (these change from run to run with the allocator and ASLR), and the absolute
path it was saved to; bpy 4.5 has no option for stable identifiers. Its geometry, objects and
packed texture are identical between runs (tests/test_sample.py compares them through bpy).
What is pinned here to get there:
- the FBX exporter's creation timestamp and absolute texture path (``_deterministic_fbx_exporter``)
  and its UUIDs, which come from Python's salted ``hash(str)`` (``main`` re-runs itself with
  PYTHONHASHSEED=0);
- the zip entry dates inside the .usdz (``pin_zip_timestamps``);
- UV spheres are built here (``add_uv_sphere``): bpy 4.5's primitive_uv_sphere_add returns its
  faces in a different order on every run.
"""

import argparse
import contextlib
import datetime
import logging
import math
import os
import shutil
import struct
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger("make_sample")

SEED = 20240601  # one seed for every random texture and displacement; change it and re-commit
FBX_TIMESTAMP = datetime.datetime(2024, 1, 1)  # written instead of now() into the FBX header


# ----------------------------------------------------------------------------------------------
# Procedural textures: uint8 (H, W, 3) sRGB arrays, row 0 at the top of the image.
# ----------------------------------------------------------------------------------------------


def wood_texture(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """Planks with grain, dark gaps and a dark frame (the crate)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size  # (H, W) each, in [0, 1)
    n_planks = 4
    plank = np.minimum((y * n_planks).astype(int), n_planks - 1)  # (H, W) plank index
    tint = rng.uniform(0.8, 1.15, n_planks)[plank]  # (H, W) per-plank brightness
    phase = rng.uniform(0, 2 * np.pi, n_planks)[plank]
    grain = 0.5 + 0.5 * np.sin(2 * np.pi * (14 * x + 2.5 * np.sin(6 * y + phase)) + phase)  # (H, W)
    base = np.array([150, 100, 55], np.float64) * (0.75 + 0.25 * grain)[..., None]  # (H, W, 3)
    base *= tint[..., None]
    gap = np.abs((y * n_planks) - np.round(y * n_planks)) < 0.04  # (H, W) dark seams
    frame = (np.minimum(x, 1 - x) < 0.06) | (np.minimum(y, 1 - y) < 0.06)
    base[gap] *= 0.35
    base[frame] = [70, 45, 25]
    return np.clip(base, 0, 255).astype(np.uint8)


def checker_texture(size: int, tiles: int, color0, color1) -> np.ndarray:
    """Checkerboard of two colours under a top-to-bottom brightness gradient."""
    y, x = np.mgrid[0:size, 0:size]  # (H, W) each
    cell = ((x * tiles // size) + (y * tiles // size)) % 2  # (H, W) in {0, 1}
    colors = np.array([color0, color1], np.float64)[cell]  # (H, W, 3)
    shade = 0.65 + 0.35 * (1 - y / (size - 1))  # (H, W)
    return np.clip(colors * shade[..., None], 0, 255).astype(np.uint8)


def rainbow_texture(size: int = 128) -> np.ndarray:
    """Hue sweep along u with dark bands along v (the torus)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    hue = x * 2 * np.pi  # (H, W)
    rgb = np.stack([0.5 + 0.5 * np.cos(hue - k * 2 * np.pi / 3) for k in range(3)], axis=-1)  # (H, W, 3)
    bands = np.where((y * 8) % 1 < 0.2, 0.3, 1.0)  # (H, W)
    return np.clip(255 * rgb * bands[..., None], 0, 255).astype(np.uint8)


def spots_texture(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """Red with white spots (the toadstool cap)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    rgb = np.full((size, size, 3), [190.0, 30.0, 25.0])  # (H, W, 3)
    centres = rng.uniform(0, 1, (14, 2))  # (S, 2) spot centres in uv
    radii = rng.uniform(0.04, 0.09, 14)  # (S,)
    for (cx, cy), r in zip(centres, radii):
        dx = np.minimum(np.abs(x - cx), 1 - np.abs(x - cx))  # wraps around u
        rgb[dx**2 + (y - cy) ** 2 < r**2] = [245, 240, 225]
    return rgb.astype(np.uint8)


def gradient_texture(size: int = 64) -> np.ndarray:
    """Diagonal teal-to-orange gradient with thin stripes (the logo)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    t = (x + y) / 2  # (H, W)
    rgb = (1 - t)[..., None] * [20, 160, 170] + t[..., None] * [250, 150, 30]  # (H, W, 3)
    rgb[((x * 16) % 1) < 0.12] *= 0.6
    return np.clip(rgb, 0, 255).astype(np.uint8)


def save_png(pixels: np.ndarray, path: Path) -> Path:
    """Write an RGB texture as PNG (PIL writes no timestamp or other varying chunk)."""
    Image.fromarray(pixels, "RGB").save(path, format="PNG")
    return path


# ----------------------------------------------------------------------------------------------
# Scene helpers (bpy is imported in main(), after HOME points at a scratch folder).
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_home():
    """Point HOME and the XDG dirs at a temporary folder, then import bpy.

    bpy writes caches and config there when it starts: keep them out of the user's home.
    """
    with tempfile.TemporaryDirectory(prefix="slatflow_bpy_home_") as home:
        for var in ("HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
            os.environ[var] = home
        import bpy  # noqa: F401  (imported only now, so that it sees the variables above)

        yield


def new_scene():
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.context.preferences.filepaths.save_version = 0  # no .blend1 backups


def add_primitive(kind: str, name: str, location=(0, 0, 0), rotation_deg=(0, 0, 0), scale=(1, 1, 1), **kw):
    """Add ``bpy.ops.mesh.primitive_<kind>_add`` and return the new object."""
    import bpy

    rotation = tuple(math.radians(a) for a in rotation_deg)
    getattr(bpy.ops.mesh, f"primitive_{kind}_add")(location=location, rotation=rotation, **kw)
    obj = bpy.context.active_object
    obj.name = obj.data.name = name
    obj.scale = scale
    return obj


def add_uv_sphere(name: str, radius: float, segments: int, rings: int, location=(0, 0, 0), scale=(1, 1, 1)):
    """A UV sphere with a UV map, built here: bpy 4.5's primitive_uv_sphere_add returns its
    faces and vertices in a different order on every run (seen in 5 of 5 runs)."""
    import bpy

    theta = np.pi * np.arange(1, rings) / rings  # (R-1,) polar angle of each inner ring
    phi = 2 * np.pi * np.arange(segments) / segments  # (S,)
    ring = np.stack(
        [
            np.outer(np.sin(theta), np.cos(phi)),
            np.outer(np.sin(theta), np.sin(phi)),
            np.outer(np.cos(theta), np.ones(segments)),
        ],
        axis=-1,
    ).reshape(
        -1, 3
    )  # ((R-1) * S, 3)
    verts = radius * np.concatenate([[[0.0, 0.0, 1.0]], ring, [[0.0, 0.0, -1.0]]])  # (V, 3)
    top, bottom = 0, len(verts) - 1

    def vid(r, s):
        return 1 + r * segments + s % segments

    faces, uvs = [], []  # faces as vertex-index tuples, counter-clockwise seen from outside
    for s in range(segments):
        u0, u1 = s / segments, (s + 1) / segments
        faces.append((top, vid(0, s), vid(0, s + 1)))
        uvs += [((u0 + u1) / 2, 1.0), (u0, 1 - 1 / rings), (u1, 1 - 1 / rings)]
        for r in range(rings - 2):
            faces.append((vid(r, s), vid(r + 1, s), vid(r + 1, s + 1), vid(r, s + 1)))
            v0, v1 = 1 - (r + 1) / rings, 1 - (r + 2) / rings
            uvs += [(u0, v0), (u0, v1), (u1, v1), (u1, v0)]
        faces.append((vid(rings - 2, s), bottom, vid(rings - 2, s + 1)))
        uvs += [(u0, 1 / rings), ((u0 + u1) / 2, 0.0), (u1, 1 / rings)]
    mesh = bpy.data.meshes.new(name)
    mesh.from_pydata(verts.tolist(), [], faces)
    mesh.uv_layers.new(name="UVMap").data.foreach_set("uv", np.asarray(uvs, np.float32).ravel())  # (L * 2,)
    mesh.shade_smooth()
    obj = bpy.data.objects.new(name, mesh)
    obj.location, obj.scale = location, scale
    bpy.context.scene.collection.objects.link(obj)
    return obj


def load_image(path: Path, pack: bool = False):
    import bpy

    image = bpy.data.images.load(str(path), check_existing=False)
    image.name = path.name
    if pack:
        image.pack()
    return image


def material(name: str, image=None, color=(0.8, 0.8, 0.8, 1.0), roughness: float = 0.6):
    """Principled BSDF material, its base colour from ``image`` when given."""
    import bpy

    mat = bpy.data.materials.new(name)
    mat.use_nodes = True
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    bsdf = nodes["Principled BSDF"]
    bsdf.inputs["Base Color"].default_value = color
    bsdf.inputs["Roughness"].default_value = roughness
    if image is not None:
        tex = nodes.new("ShaderNodeTexImage")
        tex.image = image
        tex.location = (-400, 300)
        links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    return mat


def assign(obj, mat):
    obj.data.materials.clear()
    obj.data.materials.append(mat)


def planar_uvs(mesh, axes=(0, 1)):
    """Project the mesh's local coordinates on two axes into [0, 1]^2 as its UV map."""
    n_loops = len(mesh.loops)
    co = np.zeros(len(mesh.vertices) * 3, np.float64)
    mesh.vertices.foreach_get("co", co)
    co = co.reshape(-1, 3)[:, list(axes)]  # (V, 2)
    lo, hi = co.min(0), co.max(0)
    uv_vert = (co - lo) / np.maximum(hi - lo, 1e-9)  # (V, 2) in [0, 1]
    loop_vert = np.zeros(n_loops, np.int64)
    mesh.loops.foreach_get("vertex_index", loop_vert)
    layer = mesh.uv_layers.new(name="UVMap") if not mesh.uv_layers else mesh.uv_layers[0]
    layer.data.foreach_set("uv", uv_vert[loop_vert].astype(np.float32).ravel())  # (L * 2,)


# ----------------------------------------------------------------------------------------------
# The eight assets. Each builder starts from an empty scene and writes its files under ``out``.
# ----------------------------------------------------------------------------------------------


def build_crate_obj(out: Path, rng: np.random.Generator, scratch: Path) -> None:
    """OBJ + MTL + PNG: a small wooden crate with a lid and a knob, 3 objects, off-centre."""
    import bpy

    folder = out / "crate_obj"
    folder.mkdir()
    new_scene()
    wood = material("crate_wood", load_image(save_png(wood_texture(rng), folder / "crate_wood.png")))
    brass = material("brass", color=(0.8, 0.55, 0.2, 1.0), roughness=0.3)
    x0, y0, z0 = 1.5, -0.8, 0.3  # offset from the origin; the crate is 0.5 units wide
    box = add_primitive("cube", "box", location=(x0, y0, z0), scale=(0.25, 0.2, 0.15))
    lid = add_primitive("cube", "lid", location=(x0, y0, z0 + 0.17), scale=(0.27, 0.22, 0.02))
    knob = add_uv_sphere("knob", 0.03, segments=16, rings=8, location=(x0, y0, z0 + 0.2))
    for obj, mat in ((box, wood), (lid, wood), (knob, brass)):
        assign(obj, mat)
    bpy.ops.wm.obj_export(
        filepath=str(folder / "crate.obj"),
        export_materials=True,
        path_mode="STRIP",  # map_Kd names the PNG beside the .mtl, no absolute path
        export_normals=True,
        export_uv=True,
    )


def build_lantern_gltf(out: Path, rng: np.random.Generator, scratch: Path) -> None:
    """glTF + BIN + PNG: a lantern of 4 objects (base, body, roof, handle), off-centre."""
    import bpy

    folder = out / "lantern_gltf"
    folder.mkdir()
    new_scene()
    checker = load_image(
        save_png(checker_texture(64, 8, (240, 200, 60), (120, 30, 30)), scratch / "lantern_checker.png")
    )
    glass = material("lantern_checker", checker)
    metal = material("dark_metal", color=(0.08, 0.08, 0.1, 1.0), roughness=0.35)
    x0, y0, z0 = -3.0, 4.0, 2.0
    parts = [
        (
            add_primitive(
                "cylinder", "base", location=(x0, y0, z0 + 0.15), radius=0.6, depth=0.3, vertices=24
            ),
            metal,
        ),
        (
            add_primitive(
                "cylinder", "body", location=(x0, y0, z0 + 0.9), radius=0.45, depth=1.2, vertices=24
            ),
            glass,
        ),
        (
            add_primitive("cone", "roof", location=(x0, y0, z0 + 1.8), radius1=0.7, depth=0.6, vertices=24),
            metal,
        ),
        (
            add_primitive(
                "torus",
                "handle",
                location=(x0, y0, z0 + 2.3),
                rotation_deg=(90, 0, 0),
                major_radius=0.3,
                minor_radius=0.05,
                major_segments=24,
                minor_segments=8,
            ),
            metal,
        ),
    ]
    for obj, mat in parts:
        assign(obj, mat)
    bpy.ops.export_scene.gltf(
        filepath=str(folder / "lantern.gltf"),
        export_format="GLTF_SEPARATE",  # .gltf + .bin + .png beside it
        export_image_format="AUTO",
        export_texture_dir="",
    )


def build_torus_glb(out: Path, rng: np.random.Generator, scratch: Path) -> None:
    """GLB with an embedded PNG: a 30-unit torus far from the origin, tilted."""
    import bpy

    new_scene()
    image = load_image(save_png(rainbow_texture(128), scratch / "torus_rainbow.png"))
    torus = add_primitive(
        "torus",
        "torus",
        location=(40.0, -25.0, 12.0),
        rotation_deg=(30, 0, 15),
        major_radius=11.0,
        minor_radius=4.0,
        major_segments=48,
        minor_segments=16,
    )
    assign(torus, material("torus_rainbow", image, roughness=0.4))
    bpy.ops.export_scene.gltf(
        filepath=str(out / "torus.glb"), export_format="GLB", export_image_format="AUTO"
    )


@contextlib.contextmanager
def _deterministic_fbx_exporter():
    """Pin the two run-dependent fields of Blender's FBX exporter, then restore it.

    bpy 4.5's exporter has no option for either: it stamps the header with now(), and it writes
    the texture's absolute path (inside the output folder) as Video/Texture "Filename".
    """
    from io_scene_fbx import export_fbx_bin

    header, video_path = export_fbx_bin.fbx_header_elements, export_fbx_bin._gen_vid_path

    def fixed_header(root, scene_data, time=None):
        return header(root, scene_data, FBX_TIMESTAMP)

    def basename_video_path(img, scene_data):
        name = os.path.basename(img.filepath)
        return name, name  # (absolute, relative): both the bare file name beside the .fbx

    export_fbx_bin.fbx_header_elements, export_fbx_bin._gen_vid_path = fixed_header, basename_video_path
    try:
        yield
    finally:
        export_fbx_bin.fbx_header_elements, export_fbx_bin._gen_vid_path = header, video_path


def build_suzanne_fbx(out: Path, rng: np.random.Generator, scratch: Path) -> None:
    """FBX with embedded texture (also beside it): a tiny Suzanne on a pedestal, 2 objects."""
    import bpy

    folder = out / "suzanne_fbx"
    folder.mkdir()
    new_scene()
    image = load_image(
        save_png(checker_texture(128, 8, (40, 90, 220), (235, 235, 235)), folder / "suzanne_checker.png")
    )
    x0, y0, z0 = 0.3, 0.2, -0.1  # Suzanne is 0.11 units wide here
    monkey = add_primitive("monkey", "suzanne", location=(x0, y0, z0 + 0.07), scale=(0.04, 0.04, 0.04))
    pedestal = add_primitive(
        "cylinder", "pedestal", location=(x0, y0, z0), radius=0.05, depth=0.06, vertices=16
    )
    assign(monkey, material("suzanne_checker", image))
    assign(pedestal, material("marble", color=(0.85, 0.85, 0.8, 1.0)))
    with _deterministic_fbx_exporter():
        bpy.ops.export_scene.fbx(
            filepath=str(folder / "suzanne.fbx"),
            path_mode="COPY",  # needed for embed_textures; the PNG is already beside the file
            embed_textures=True,
            object_types={"MESH"},
            bake_anim=False,
        )


def build_rock_ply(out: Path, rng: np.random.Generator, scratch: Path) -> None:
    """PLY with per-vertex sRGB colours: a bumpy rock (displaced icosphere), moss on top."""
    import bpy

    new_scene()
    rock = add_primitive("ico_sphere", "rock", location=(2.0, -3.0, 20.0), subdivisions=5, radius=5.0)
    mesh = rock.data
    co = np.zeros(len(mesh.vertices) * 3, np.float64)
    mesh.vertices.foreach_get("co", co)
    co = co.reshape(-1, 3)  # (V, 3) local, on the radius-5 sphere
    dirs = co / np.linalg.norm(co, axis=1, keepdims=True)  # (V, 3)
    waves = rng.normal(size=(6, 3)) * 2.0  # (K, 3) low-frequency directions
    phases, amps = rng.uniform(0, 2 * np.pi, 6), rng.uniform(0.03, 0.08, 6)  # (K,) each
    bumps = (amps * np.sin(dirs @ waves.T + phases)).sum(1)  # (V,)
    co = co * (1.0 + bumps)[:, None] * [1.0, 0.8, 0.6]  # flattened, bumpy
    mesh.vertices.foreach_set("co", co.ravel())
    height = (dirs[:, 2] + 1) / 2  # (V,) 0 at the bottom, 1 at the top
    grey = np.array([110, 100, 90], np.float64) * (0.7 + 0.6 * rng.uniform(size=(len(co), 1)) * 0.5)  # (V, 3)
    moss = np.array([60, 140, 50], np.float64)
    t = np.clip((height - 0.7) / 0.2, 0, 1)[:, None]  # (V, 1) moss weight
    rgb = (1 - t) * grey + t * moss  # (V, 3) sRGB 0..255
    rgba = np.concatenate([rgb / 255, np.ones((len(co), 1))], axis=1)  # (V, 4)
    colors = mesh.color_attributes.new("Col", "BYTE_COLOR", "POINT")
    colors.data.foreach_set("color_srgb", rgba.astype(np.float32).ravel())
    mesh.update()
    bpy.ops.wm.ply_export(
        filepath=str(out / "rock.ply"),
        export_colors="SRGB",
        export_uv=False,  # per-vertex UVs of a sphere seam are meaningless; colours carry the look
        export_normals=False,
        ascii_format=False,
    )


def build_chair_stl(out: Path, rng: np.random.Generator, scratch: Path) -> None:
    """STL (no colour): a chair of 8 parts in millimetres (~900 units tall), off-centre."""
    import bpy

    new_scene()
    x0, y0 = 600.0, 300.0
    half = (225.0, 210.0)  # seat half-width (x), half-depth (y)
    seat = add_primitive("cube", "seat", location=(x0, y0, 455.0))
    seat.data.transform(np.diag([half[0], half[1], 15.0, 1.0]))  # in the mesh, so the bevel is in mm
    bevel = seat.modifiers.new("bevel", "BEVEL")
    bevel.width, bevel.segments = 8.0, 3
    for i, (sx, sy) in enumerate(((-1, -1), (1, -1), (-1, 1), (1, 1))):
        leg_x, leg_y = x0 + sx * (half[0] - 20), y0 + sy * (half[1] - 20)
        add_primitive(
            "cylinder", f"leg{i}", location=(leg_x, leg_y, 220.0), radius=15.0, depth=440.0, vertices=12
        )
    back_y = y0 + half[1] - 12
    for i, sx in enumerate((-1, 1)):
        add_primitive(
            "cube", f"post{i}", location=(x0 + sx * (half[0] - 20), back_y, 700.0), scale=(15, 15, 230)
        )
    add_primitive("cube", "backrest", location=(x0, back_y, 840.0), scale=(half[0], 12.0, 60.0))
    bpy.ops.wm.stl_export(filepath=str(out / "chair.stl"), ascii_format=False, apply_modifiers=True)


def build_mushroom_blend(out: Path, rng: np.random.Generator, scratch: Path) -> None:
    """.blend: a toadstool (stem, cap, grass ring) with a packed texture, a camera, a light,
    and two hidden helpers a renderer must drop: a 400-unit plane hidden by its object flags
    and a 300-unit cube in a collection hidden from render and viewport."""
    import bpy

    new_scene()
    scene = bpy.context.scene
    spots = load_image(save_png(spots_texture(rng), scratch / "toadstool_spots.png"), pack=True)
    spots.filepath_raw = "//textures/toadstool_spots.png"  # packed; no scratch path in the file
    x0, y0 = 5.0, 5.0
    stem = add_primitive("cylinder", "stem", location=(x0, y0, 1.0), radius=0.35, depth=2.0, vertices=24)
    cap = add_uv_sphere("cap", 1.0, segments=32, rings=16, location=(x0, y0, 2.0), scale=(1.5, 1.5, 0.8))
    grass = add_primitive(
        "torus",
        "grass",
        location=(x0, y0, 0.05),
        major_radius=0.8,
        minor_radius=0.12,
        major_segments=32,
        minor_segments=8,
    )
    assign(stem, material("stem", color=(0.9, 0.87, 0.75, 1.0)))
    assign(cap, material("toadstool_spots", spots, roughness=0.5))
    assign(grass, material("grass", color=(0.15, 0.5, 0.1, 1.0)))

    ground = add_primitive("plane", "hidden_ground", location=(0, 0, -1.0), size=400.0)
    ground.hide_render = ground.hide_viewport = True
    ground.hide_set(True)
    helpers = bpy.data.collections.new("hidden_helpers")
    scene.collection.children.link(helpers)
    cube = add_primitive("cube", "hidden_backdrop", location=(0, 150.0, 0), size=300.0)
    for coll in cube.users_collection:
        coll.objects.unlink(cube)
    helpers.objects.link(cube)
    helpers.hide_render = helpers.hide_viewport = True

    cam_data = bpy.data.cameras.new("camera")
    camera = bpy.data.objects.new("camera", cam_data)
    camera.location, camera.rotation_euler = (x0 + 7, y0 - 7, 5.0), (math.radians(70), 0, math.radians(45))
    sun = bpy.data.objects.new("sun", bpy.data.lights.new("sun", "SUN"))
    sun.location, sun.rotation_euler = (x0, y0, 10.0), (math.radians(30), 0, math.radians(20))
    for obj in (camera, sun):
        scene.collection.objects.link(obj)
    scene.camera = camera
    bpy.ops.wm.save_as_mainfile(filepath=str(out / "mushroom.blend"), compress=False, relative_remap=True)


def pin_zip_timestamps(path: Path) -> None:
    """Set every entry's DOS date in a zip (here a .usdz) to 1980-01-01 00:00, in place.

    USD's zip writer stamps entries with the current time. Only the fixed-size date fields
    change, so the 64-byte data alignment USDZ requires and every offset stay as they are.
    """
    epoch = struct.pack("<HH", 0, (1 << 5) | 1)  # DOS time 00:00:00, date 1980-01-01
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        local_offsets = [info.header_offset for info in zf.infolist()]
    for offset in local_offsets:
        assert data[offset : offset + 4] == b"PK\x03\x04", f"no local file header at {offset} in {path}"
        data[offset + 10 : offset + 14] = epoch
    end = data.rfind(b"PK\x05\x06")  # end of central directory record
    n_entries, _, cd_offset = struct.unpack_from("<HII", data, end + 10)
    pos = cd_offset
    for _ in range(n_entries):
        assert data[pos : pos + 4] == b"PK\x01\x02", f"no central directory header at {pos} in {path}"
        data[pos + 12 : pos + 16] = epoch
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        pos += 46 + name_len + extra_len + comment_len
    path.write_bytes(bytes(data))


def build_logo_usdz(out: Path, rng: np.random.Generator, scratch: Path) -> None:
    """USDZ with a packaged texture: the word SLAT extruded and bevelled, standing upright."""
    import bpy

    new_scene()
    curve = bpy.data.curves.new("logo_text", "FONT")
    curve.body, curve.size, curve.extrude, curve.bevel_depth = "SLAT", 1.6, 0.15, 0.02
    curve.align_x, curve.align_y = "CENTER", "CENTER"
    text = bpy.data.objects.new("logo_text", curve)
    bpy.context.scene.collection.objects.link(text)
    mesh = bpy.data.meshes.new_from_object(text.evaluated_get(bpy.context.evaluated_depsgraph_get()))
    mesh.name = "logo"
    planar_uvs(mesh, axes=(0, 1))
    logo = bpy.data.objects.new("logo", mesh)
    logo.location, logo.rotation_euler = (-8.0, 2.0, 1.0), (math.radians(90), 0, math.radians(-20))
    bpy.context.scene.collection.objects.link(logo)
    bpy.data.objects.remove(text)
    image = load_image(save_png(gradient_texture(64), scratch / "logo_gradient.png"))
    assign(logo, material("logo_gradient", image, roughness=0.3))
    bpy.ops.wm.usd_export(
        filepath=str(out / "logo.usdz"),
        export_materials=True,
        generate_preview_surface=True,
        export_textures=True,
        export_cameras=False,
        export_lights=False,
        convert_world_material=False,
    )
    pin_zip_timestamps(out / "logo.usdz")


BUILDERS = (
    build_crate_obj,
    build_lantern_gltf,
    build_torus_glb,
    build_suzanne_fbx,
    build_rock_ply,
    build_chair_stl,
    build_mushroom_blend,
    build_logo_usdz,
)


# What build_sample writes at the top of --out (it refuses to clear a folder holding anything else).
TOP_LEVEL_NAMES = {
    "crate_obj", "lantern_gltf", "torus.glb", "suzanne_fbx", "rock.ply", "chair.stl", "mushroom.blend", "logo.usdz",
}  # fmt: skip


def build_sample(out: Path) -> None:
    """Delete ``out`` and write the 8 assets into it; one numpy Generator per asset, seeded."""
    if out.exists():
        foreign = sorted({p.name for p in out.iterdir()} - TOP_LEVEL_NAMES)
        if foreign:  # never delete a folder this script did not write
            raise SystemExit(f"{out} holds {foreign}, which make_sample.py did not write; pick another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="slatflow_sample_") as scratch:
        for index, build in enumerate(BUILDERS):
            rng = np.random.default_rng([SEED, index])
            logger.info("building %s", build.__name__)
            build(out, rng, Path(scratch))
    for path in sorted(out.rglob("*")):
        if path.is_file():
            logger.info("%8d  %s", path.stat().st_size, path.relative_to(out))


def main() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":
        # Blender's Python exporters key objects by hash(str) (the FBX UUIDs), which Python
        # salts per process: restart with a fixed salt so two runs write the same bytes.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "assets")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with scratch_home():
        build_sample(args.out.resolve())


if __name__ == "__main__":
    main()
