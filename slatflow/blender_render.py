"""The Blender side of the render stage: runs inside a bpy subprocess, one asset per process.

`slatflow.render` starts `python blender_render.py JOB.json` with a Python that has bpy
(Blender 4.5 LTS, Python 3.11) and keeps everything it prints in the rule's log. This file
reproduces TRELLIS's `dataset_toolkits/blender_script/render.py` (Blender 3.0) on the 4.x API:
scene reset, import, normalization over the mesh objects, the three-light rig, a TRACK_TO
camera, Cycles at the configured settings, then `mesh.ply` and `transforms.json` last.

It imports only the standard library and bpy (and Blender's own `gpu` module for EEVEE; numpy
and trimesh where present, for the NaN check), so it runs by path in any Python that has bpy,
whether or not slatflow is installed there.

Exit codes (read by `slatflow.render`): 0 done; 3 the asset cannot be rendered (the reason is
in the result file); 4 the run's settings cannot work here (a GPU that is absent); anything
else is a crash, reported with the phase it happened in.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import struct
import sys
import time
import traceback

EXIT_OK = 0
EXIT_ASSET_ERROR = 3
EXIT_SETTINGS_ERROR = 4

# printed before each phase; slatflow.render names the last one when Blender crashes
PHASE_MARKER = "SLATFLOW_PHASE"

# Blender 3.0's default world (TRELLIS keeps it): a uniform grey background that adds ambient light
DEFAULT_WORLD_GREY = 0.050876

# TRELLIS's light rig: (name, type, energy in W, location, scale)
LIGHT_RIG = (
    ("slatflow_key_light", "POINT", 1000.0, (4.0, 1.0, 6.0), (1.0, 1.0, 1.0)),
    ("slatflow_top_light", "AREA", 10000.0, (0.0, 0.0, 10.0), (100.0, 100.0, 100.0)),
    # faces -Z like every area light created without rotation, so it lights nothing above it;
    # kept because TRELLIS's renders include it
    ("slatflow_bottom_light", "AREA", 1000.0, (0.0, 0.0, -10.0), (1.0, 1.0, 1.0)),
)

SENSOR_WIDTH_MM = 32.0  # TRELLIS's sensor; the lens follows from the field of view

# render.engine of the raster path: Blender only loads, normalizes and exports the scene
RASTER_ENGINE = "RASTER"

GEOMETRY_TYPES = {"MESH", "CURVE", "SURFACE", "FONT", "META", "CURVES", "POINTCLOUD"}


class AssetFailure(Exception):
    """The asset cannot be rendered; the message is the one-line reason."""


class SettingsFailure(Exception):
    """The settings cannot work on this machine (not the asset's fault)."""


def _phase(name: str) -> None:
    print(f"{PHASE_MARKER} {name}", flush=True)


def _log(message: str) -> None:
    print(f"[slatflow.blender_render] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Scene loading


def _reset_scene(bpy) -> None:
    """Empty the default scene as TRELLIS does (objects, materials, textures, images), keeping
    the world, whose grey background lights every TRELLIS render."""
    for collection in (bpy.data.objects, bpy.data.meshes, bpy.data.lights, bpy.data.cameras,
                       bpy.data.materials, bpy.data.textures, bpy.data.images):
        for item in list(collection):
            collection.remove(item, do_unlink=True)
    scene = bpy.context.scene
    if scene.world is None:
        world = bpy.data.worlds.new("World")
        world.color = (DEFAULT_WORLD_GREY,) * 3
        scene.world = world


def _import_operator(bpy, fmt: str):
    """The bpy operator and keyword arguments that import a file of format `fmt`."""
    ops = bpy.ops
    if fmt in ("glb", "gltf"):
        # merge_vertices as TRELLIS; no bone shapes (3.0's importer made none, they are meshes)
        return ops.import_scene.gltf, {"merge_vertices": True, "import_shading": "NORMALS",
                                       "disable_bone_shape": True}
    if fmt == "obj":
        return ops.wm.obj_import, {}
    if fmt == "fbx":
        return ops.import_scene.fbx, {}
    if fmt == "ply":
        return ops.wm.ply_import, {}
    if fmt == "stl":
        return ops.wm.stl_import, {}
    if fmt in ("usd", "usda", "usdc", "usdz"):
        # no world from dome lights: TRELLIS lights every asset with the same rig and no HDRI
        return ops.wm.usd_import, {"create_world_material": False}
    if fmt == "abc":
        return ops.wm.alembic_import, {"as_background_job": False}
    if fmt == "dae":
        if "collada_import" not in dir(ops.wm):  # removed in Blender 5.0
            raise AssetFailure(f"this Blender ({bpy.app.version_string}) has no COLLADA (.dae) importer")
        return ops.wm.collada_import, {}
    raise AssetFailure(f"unsupported format {fmt!r}")


def _import_file(bpy, source: str, fmt: str) -> None:
    """Import `source` into the emptied scene; a failed import is the asset's fault."""
    operator, kwargs = _import_operator(bpy, fmt)
    try:
        result = operator(filepath=source, **kwargs)
    except (RuntimeError, ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        # importers report bad files as RuntimeError("Error: ...") or fail inside their Python
        traceback.print_exc()
        first = " ".join(str(exc).split())[:300]
        raise AssetFailure(f"Blender could not import {os.path.basename(source)} as {fmt}: {first}")
    if "FINISHED" not in result:
        raise AssetFailure(f"Blender's {fmt} importer returned {sorted(result)} for {os.path.basename(source)}")


def _open_blend(bpy, source: str) -> None:
    """Open a .blend file as the scene (TRELLIS passes it to Blender on the command line)."""
    try:
        bpy.ops.wm.open_mainfile(filepath=source, load_ui=False)
    except RuntimeError as exc:
        traceback.print_exc()
        raise AssetFailure(f"Blender could not open {os.path.basename(source)}: {' '.join(str(exc).split())[:300]}")
    _remove_hidden_objects(bpy)


def _collection_hidden(collection, layer_collection_hidden: set) -> bool:
    return collection.hide_render or collection.hide_viewport or collection.name in layer_collection_hidden


def _remove_hidden_objects(bpy) -> None:
    """Delete what the .blend hides (TRELLIS: objects hidden in viewport or render, and hidden
    collections), so it neither renders nor enters the bounding box or mesh.ply."""
    scene = bpy.context.scene
    excluded = set()

    def walk(layer_collection):
        if layer_collection.exclude or layer_collection.hide_viewport:
            excluded.add(layer_collection.collection.name)
        for child in layer_collection.children:
            walk(child)

    walk(bpy.context.view_layer.layer_collection)
    hidden_collections = {c.name for c in bpy.data.collections if _collection_hidden(c, excluded)}
    removed = []
    for obj in list(scene.objects):
        in_hidden = any(c.name in hidden_collections for c in obj.users_collection)
        if obj.hide_viewport or obj.hide_render or in_hidden:
            removed.append(obj.name)
            bpy.data.objects.remove(obj, do_unlink=True)
    for name in hidden_collections:
        bpy.data.collections.remove(bpy.data.collections[name])
    _log(f"removed {len(removed)} hidden object(s) from the .blend: {removed[:20]}")


# Blender's importers turn NaN and infinite coordinates into 0 without a word (the asset then
# renders, voxelizes and fails only the quality check), so they are counted in the source file
# itself, by trimesh, for the formats it reads; the others are left to Blender.
FINITE_CHECK_FORMATS = {"glb", "gltf", "obj", "ply", "stl"}


def count_nonfinite_vertices(source: str, fmt: str) -> int | None:
    """The vertices of `source` with a NaN or infinite coordinate; None when not counted (a
    format trimesh does not read, no trimesh here, or a file it cannot parse: Blender's importer
    then says what is wrong with it)."""
    if fmt not in FINITE_CHECK_FORMATS:
        return None
    try:
        import numpy as np
        import trimesh
    except ImportError:
        _log("trimesh is not installed here: vertices are not checked for NaN/inf")
        return None
    try:
        scene = trimesh.load(source, file_type=fmt, force="scene", process=False, skip_materials=True)
    except Exception:  # noqa: BLE001 - any parser error; Blender reports the file's problem
        return None
    vertices = [np.asarray(g.vertices, dtype=np.float64) for g in scene.geometry.values() if hasattr(g, "vertices")]
    return sum(int((~np.isfinite(v).all(axis=1)).sum()) for v in vertices)


def load_scene(bpy, source: str, fmt: str) -> None:
    """Import `source` (or open it, a .blend) as the scene, shared by every render engine.

    Raises:
        AssetFailure: vertices that are not finite, or a file Blender cannot import.
    """
    nonfinite = count_nonfinite_vertices(source, fmt)
    if nonfinite:
        raise AssetFailure(f"{nonfinite} vertices are not finite (NaN or infinite coordinates) in "
                           f"{os.path.basename(source)}")
    if fmt == "blend":
        _open_blend(bpy, source)
    else:
        _reset_scene(bpy)
        _import_file(bpy, source, fmt)
    bpy.context.view_layer.update()


# ---------------------------------------------------------------------------------------------
# Normalization, lights, camera


def _mesh_objects(bpy):
    return [obj for obj in bpy.context.scene.objects if obj.type == "MESH"]


def _mesh_bbox(bpy):
    """World AABB of the mesh objects' bounding boxes (TRELLIS's scene_bbox)."""
    lo = [math.inf] * 3
    hi = [-math.inf] * 3
    for obj in _mesh_objects(bpy):
        m = obj.matrix_world
        for corner in obj.bound_box:
            p = [m[i][0] * corner[0] + m[i][1] * corner[1] + m[i][2] * corner[2] + m[i][3] for i in range(3)]
            lo = [min(a, b) for a, b in zip(lo, p)]
            hi = [max(a, b) for a, b in zip(hi, p)]
    return lo, hi


def _check_geometry(bpy) -> None:
    scene = bpy.context.scene
    meshes = _mesh_objects(bpy)
    if not meshes:
        kinds = sorted({obj.type for obj in scene.objects})
        raise AssetFailure(f"no mesh objects in the scene after loading (object types: {kinds or 'none'})")
    depsgraph = bpy.context.evaluated_depsgraph_get()
    faces = sum(len(obj.evaluated_get(depsgraph).data.polygons) for obj in meshes)
    other_geometry = [obj for obj in scene.objects if obj.type in GEOMETRY_TYPES - {"MESH"}]
    if faces == 0 and not other_geometry:
        verts = sum(len(obj.evaluated_get(depsgraph).data.vertices) for obj in meshes)
        raise AssetFailure(f"the mesh objects have no faces ({verts} vertices): nothing to render")


def normalize_scene(bpy) -> tuple[float, list[float]]:
    """Scale and move the scene so the mesh objects' AABB has longest side 1, centred at 0.

    The box is TRELLIS's: the world AABB of each mesh object's local bounding-box corners,
    which is looser than the geometry's own AABB for a rotated object, so such an asset fills
    less than the unit cube (kept: it is how TRELLIS's data was made). All root objects are
    parented to a new empty at the origin (TRELLIS does so only for several roots), so that
    p_norm = p * scale + offset holds for every world point p.

    Returns:
        scale, offset (3 floats).
    """
    _check_geometry(bpy)
    scene = bpy.context.scene
    roots = [obj for obj in scene.objects if obj.parent is None]
    root = bpy.data.objects.new("slatflow_normalize_root", None)
    scene.collection.objects.link(root)
    for obj in roots:
        obj.parent = root  # root is the identity, so world matrices do not change
    bpy.context.view_layer.update()
    lo, hi = _mesh_bbox(bpy)
    extent = max(h - l for l, h in zip(lo, hi))
    if not math.isfinite(extent) or extent <= 0:
        raise AssetFailure(f"the mesh objects' bounding box is degenerate (min {lo}, max {hi})")
    scale = 1.0 / extent
    root.scale = (scale, scale, scale)
    bpy.context.view_layer.update()
    lo, hi = _mesh_bbox(bpy)
    offset = [-(l + h) / 2 for l, h in zip(lo, hi)]
    root.location = offset
    bpy.context.view_layer.update()
    _log(f"normalized: scale {scale:.6g}, offset {offset}")
    return scale, offset


def setup_lights(bpy) -> None:
    """TRELLIS's rig, after removing the asset's own lights."""
    for obj in [o for o in bpy.context.scene.objects if o.type == "LIGHT"]:
        bpy.data.objects.remove(obj, do_unlink=True)
    for name, kind, energy, location, scale in LIGHT_RIG:
        light = bpy.data.lights.new(name, type=kind)
        light.energy = energy
        obj = bpy.data.objects.new(name, light)
        obj.location = location
        obj.scale = scale
        bpy.context.scene.collection.objects.link(obj)


def setup_camera(bpy):
    """A camera that always looks at the origin: TRACK_TO (-Z forward, Y up) on an empty."""
    scene = bpy.context.scene
    camera = bpy.data.objects.new("slatflow_camera", bpy.data.cameras.new("slatflow_camera"))
    camera.data.sensor_width = camera.data.sensor_height = SENSOR_WIDTH_MM
    scene.collection.objects.link(camera)
    target = bpy.data.objects.new("slatflow_camera_target", None)
    scene.collection.objects.link(target)
    constraint = camera.constraints.new(type="TRACK_TO")
    constraint.track_axis = "TRACK_NEGATIVE_Z"
    constraint.up_axis = "UP_Y"
    constraint.target = target
    scene.camera = camera
    return camera


def place_camera(camera, view: dict) -> None:
    yaw, pitch, radius = view["yaw"], view["pitch"], view["radius"]
    camera.location = (
        radius * math.cos(yaw) * math.cos(pitch),
        radius * math.sin(yaw) * math.cos(pitch),
        radius * math.sin(pitch),
    )
    camera.data.lens = SENSOR_WIDTH_MM / 2 / math.tan(view["fov"] / 2)


def camera_to_world(camera) -> list[list[float]]:
    """The camera's world rotation and position as a 4x4 list (scale dropped, as TRELLIS)."""
    position, rotation, _ = camera.matrix_world.decompose()
    r = rotation.to_matrix()
    return [[r[i][0], r[i][1], r[i][2], position[i]] for i in range(3)] + [[0.0, 0.0, 0.0, 1.0]]


# ---------------------------------------------------------------------------------------------
# Render settings and device


def _enable_device(bpy, scene, device: str) -> str:
    """Select the Cycles device; a GPU type that has no device here is an error, never a CPU render."""
    if device == "CPU":
        scene.cycles.device = "CPU"
        return f"CPU ({scene.render.threads} threads)"
    prefs = bpy.context.preferences.addons["cycles"].preferences
    try:
        prefs.compute_device_type = device
    except TypeError as exc:
        raise SettingsFailure(f"this Blender's Cycles has no {device} backend: {exc}")
    prefs.refresh_devices()
    found = [(d.name, d.type) for d in prefs.devices]
    gpus = [d for d in prefs.devices if d.type == device]
    if not gpus:
        raise SettingsFailure(f"device {device} was asked for but Cycles found no {device} device "
                              f"(devices: {found}); set render.device to CPU or run on a {device} machine")
    for d in prefs.devices:
        d.use = d.type == device  # GPU devices only: TRELLIS never enabled them at all
    scene.cycles.device = "GPU"
    return f"{device}: " + ", ".join(d.name for d in gpus)


def _disable_metadata_stamps(render) -> None:
    """No date, time or render time in the PNGs' text chunks: two renders are byte-identical."""
    for name in dir(render):
        if name.startswith("use_stamp") and isinstance(getattr(render, name), bool):
            try:
                setattr(render, name, False)
            except (AttributeError, TypeError):
                pass


def drop_timing_metadata(path: str) -> None:
    """Remove the render-time text chunks Cycles writes into every PNG (`cycles.*_time`), the
    only bytes that differ between two renders of one asset. Chunks are copied, not re-encoded."""
    with open(path, "rb") as f:
        data = f.read()
    kept, pos = [data[:8]], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if not (kind == b"tEXt" and data[pos + 8:end - 4].split(b"\0", 1)[0].endswith(b"_time")):
            kept.append(data[pos:end])
        pos = end
    with open(path, "wb") as f:
        f.write(b"".join(kept))


def configure_render(bpy, settings: dict, resolution: int, threads: int) -> str:
    """Apply the render settings; return a description of the device that renders."""
    scene = bpy.context.scene
    render = scene.render
    render.engine = settings["engine"]
    render.resolution_x = render.resolution_y = resolution
    render.resolution_percentage = 100
    render.image_settings.file_format = "PNG"
    render.image_settings.color_mode = "RGBA"
    render.image_settings.color_depth = "8"
    render.film_transparent = True
    # a .blend brings its own render settings: none of them may move pixels off the cameras
    # that transforms.json records (a render region, non-square pixels, stereo views)
    render.use_border = False
    render.pixel_aspect_x = render.pixel_aspect_y = 1.0
    render.use_multiview = False
    render.use_persistent_data = bool(settings["persistent_data"])
    if threads > 0:
        render.threads_mode = "FIXED"
        render.threads = threads
    _disable_metadata_stamps(render)
    scene.display_settings.display_device = "sRGB"
    scene.view_settings.view_transform = settings["view_transform"]  # 4.x defaults to AgX
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0
    scene.view_settings.gamma = 1.0
    scene.sequencer_colorspace_settings.name = "sRGB"

    if settings["engine"] == "CYCLES":
        cycles = scene.cycles
        cycles.samples = settings["samples"]
        cycles.use_adaptive_sampling = settings["adaptive_threshold"] > 0
        if settings["adaptive_threshold"] > 0:
            cycles.adaptive_threshold = settings["adaptive_threshold"]
        cycles.pixel_filter_type = "BOX"
        cycles.filter_width = settings["filter_width"]
        cycles.diffuse_bounces = settings["diffuse_bounces"]
        cycles.glossy_bounces = settings["glossy_bounces"]
        cycles.transparent_max_bounces = settings["transparent_bounces"]
        cycles.transmission_bounces = settings["transmission_bounces"]
        cycles.use_denoising = bool(settings["denoise"])
        if settings["denoise"]:
            cycles.denoiser = settings["denoiser"]
            cycles.denoising_input_passes = "RGB_ALBEDO_NORMAL"
            cycles.denoising_prefilter = "ACCURATE"
        cycles.seed = 0
        cycles.use_animated_seed = False
        cycles.tile_size = settings["tile_size"]
        return _enable_device(bpy, scene, settings["device"])

    # EEVEE renders through OpenGL; headless it needs EGL (Mesa's llvmpipe on a CPU machine)
    scene.eevee.taa_render_samples = settings["samples"]
    return "EEVEE (OpenGL context not created yet)"


def eevee_device() -> str:
    """The OpenGL renderer EEVEE used; known only once a render has created the context."""
    try:
        gpu = importlib.import_module("gpu")  # Blender's GPU module, part of bpy
        return f"EEVEE on {gpu.platform.renderer_get()} ({gpu.platform.backend_type_get()})"
    except Exception as exc:  # noqa: BLE001 - only a description for the log
        return f"EEVEE (OpenGL renderer unknown: {exc})"


# ---------------------------------------------------------------------------------------------
# Mesh export


def _select_only(bpy, objects) -> None:
    for obj in bpy.context.view_layer.objects:
        obj.select_set(False)
    for obj in objects:
        obj.select_set(True)
    bpy.context.view_layer.objects.active = objects[0]


def export_mesh(bpy, path: str) -> None:
    """Convert every object to a mesh, triangulate (Beauty, as TRELLIS) and export a binary PLY
    of positions and faces in the normalized world frame."""
    scene = bpy.context.scene
    for obj in scene.objects:
        obj.hide_set(False)
        obj.hide_viewport = False
    convertible = [obj for obj in scene.objects if obj.type in GEOMETRY_TYPES]
    _select_only(bpy, convertible)
    bpy.ops.object.convert(target="MESH")  # applies modifiers, turns curves and text into meshes
    meshes = _mesh_objects(bpy)
    _select_only(bpy, meshes)
    bpy.ops.object.mode_set(mode="EDIT")
    bpy.ops.mesh.reveal()
    bpy.ops.mesh.select_all(action="SELECT")
    bpy.ops.mesh.quads_convert_to_tris(quad_method="BEAUTY", ngon_method="BEAUTY")
    bpy.ops.object.mode_set(mode="OBJECT")
    result = bpy.ops.wm.ply_export(
        filepath=path,
        export_selected_objects=False,
        apply_modifiers=True,
        export_triangulated_mesh=True,  # whatever the edit-mode pass missed
        export_normals=False,
        export_uv=False,
        export_colors="NONE",
        export_attributes=False,
        ascii_format=False,
        forward_axis="Y",
        up_axis="Z",  # Blender's own frame: the cameras' frame
    )
    if "FINISHED" not in result or not os.path.exists(path):
        raise RuntimeError(f"PLY export returned {sorted(result)}")


def export_scene_glb(bpy, path: str) -> None:
    """Export the normalized scene as a binary glTF for the raster engine: triangulated meshes
    with modifiers applied, normals, UVs, PBR materials and their images, in Blender's own Z-up
    frame (the cameras' frame), so no axis conversion sits between the two renderers.

    Vertex colours go along only where a material uses them: Cycles ignores the colours of an
    object without a material (a coloured PLY renders grey), and the raster engine must agree.
    """
    result = bpy.ops.export_scene.gltf(
        filepath=path,
        check_existing=False,
        export_format="GLB",
        export_yup=False,
        export_apply=True,
        export_skins=False,  # the posed mesh, as Cycles sees it
        export_morph=False,
        export_animations=False,
        export_cameras=False,
        export_lights=False,
        export_extras=False,
        export_materials="EXPORT",
        export_image_format="AUTO",  # a PNG stays PNG, a JPEG JPEG: no re-encode where avoidable
        export_vertex_color="MATERIAL",
        export_active_vertex_color_when_no_material=False,
        export_normals=True,
        export_texcoords=True,
        export_tangents=False,
        will_save_settings=False,
    )
    if "FINISHED" not in result or not os.path.exists(path):
        raise RuntimeError(f"glTF export returned {sorted(result)}")


# ---------------------------------------------------------------------------------------------
# The job


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def run_job(job: dict) -> dict:
    """Render one asset as `job` says; return the result record."""
    started = time.monotonic()
    out_dir = job["output_dir"]
    settings = job["settings"]
    os.makedirs(out_dir, exist_ok=True)

    _phase("import")
    import bpy

    _log(f"Blender {bpy.app.version_string}; source {job['source']} ({job['format']})")
    load_scene(bpy, job["source"], job["format"])
    _phase("normalize")
    scale, offset = normalize_scene(bpy)
    if settings["engine"] == RASTER_ENGINE:
        return _export_for_raster(bpy, job, scale, offset, started)
    setup_lights(bpy)
    camera = setup_camera(bpy)
    _phase("configure")
    device = configure_render(bpy, settings, job["resolution"], job["threads"])
    _log(f"rendering {len(job['views'])} views at {job['resolution']}^2 with {settings['engine']} "
         f"on {device}")
    load_seconds = time.monotonic() - started

    frames = []
    view_seconds = []
    for i, view in enumerate(job["views"]):
        _phase(f"render view {i}")
        place_camera(camera, view)
        name = f"{i:03d}.png"
        bpy.context.scene.render.filepath = os.path.join(out_dir, name)
        t = time.monotonic()
        bpy.ops.render.render(write_still=True)
        view_seconds.append(time.monotonic() - t)
        drop_timing_metadata(bpy.context.scene.render.filepath)
        if i == 0 and settings["engine"] != "CYCLES":
            device = eevee_device()
            _log(f"rendered on {device}")
        bpy.context.view_layer.update()
        frames.append({"file_path": name, "camera_angle_x": view["fov"],
                       "transform_matrix": camera_to_world(camera)})
        _log(f"view {i:03d} rendered in {view_seconds[-1]:.2f} s")

    mesh_seconds = 0.0
    if job["save_mesh"]:
        _phase("export mesh")
        t = time.monotonic()
        export_mesh(bpy, os.path.join(out_dir, "mesh.ply"))
        mesh_seconds = time.monotonic() - t
        _log(f"mesh.ply exported in {mesh_seconds:.2f} s")

    _phase("write transforms")
    transforms = {"aabb": [[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]], "scale": scale, "offset": offset}
    transforms.update(job["transforms_extra"])
    transforms["renderer"] = {"blender": bpy.app.version_string, "engine": settings["engine"],
                              "device": settings["device"] if settings["engine"] == "CYCLES" else "GL",
                              "samples": settings["samples"], "resolution": job["resolution"]}
    transforms["frames"] = frames
    # last: its existence means every PNG and mesh.ply is complete
    _write_json(os.path.join(out_dir, "transforms.json"), transforms)
    return {"ok": True, "device": device, "load_seconds": load_seconds, "view_seconds": view_seconds,
            "mesh_seconds": mesh_seconds, "total_seconds": time.monotonic() - started}


def _export_for_raster(bpy, job: dict, scale: float, offset: list[float], started: float) -> dict:
    """The raster engine's half of the job: the normalized scene as a glb, and mesh.ply."""
    _phase("export scene")
    t = time.monotonic()
    export_scene_glb(bpy, job["scene_path"])
    scene_seconds = time.monotonic() - t
    _log(f"scene.glb exported in {scene_seconds:.2f} s ({os.path.getsize(job['scene_path'])} bytes)")
    mesh_seconds = 0.0
    if job["save_mesh"]:
        _phase("export mesh")
        t = time.monotonic()
        export_mesh(bpy, os.path.join(job["output_dir"], "mesh.ply"))
        mesh_seconds = time.monotonic() - t
        _log(f"mesh.ply exported in {mesh_seconds:.2f} s")
    return {"ok": True, "device": "bpy export", "scale": scale, "offset": offset,
            "blender": bpy.app.version_string, "scene_seconds": scene_seconds,
            "mesh_seconds": mesh_seconds, "load_seconds": time.monotonic() - started}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python blender_render.py JOB.json", file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        job = json.load(f)
    result_path = job["result_path"]
    try:
        result = run_job(job)
        code = EXIT_OK
    except AssetFailure as exc:
        result, code = {"ok": False, "reason": str(exc)}, EXIT_ASSET_ERROR
    except SettingsFailure as exc:
        result, code = {"ok": False, "reason": str(exc)}, EXIT_SETTINGS_ERROR
    _write_json(result_path, result)
    if code != EXIT_OK:
        print(f"[slatflow.blender_render] FAILED: {result['reason']}", flush=True)
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
