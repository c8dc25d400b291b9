"""Import every sample asset with bpy 4.5's own importers and report what came through, as JSON.

    .venv/bin/python sample/check_sample.py [sample/assets] [--json report.json]

Per asset: the importer used, visible mesh objects and faces, their world-space bounds, hidden
and non-mesh objects, textures reaching a material (an Image Texture node whose image has
pixels), colour attributes, and an order-independent digest of the visible geometry (to
compare two builds of a file whose bytes differ, like the .blend). tests/test_sample.py runs it.
"""

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

import numpy as np

from make_sample import scratch_home

logger = logging.getLogger("check_sample")

# The 4.x importers, one per format (the legacy Python OBJ/PLY/STL add-ons are gone in 4.x).
IMPORTERS = {
    ".glb": "import_scene.gltf",
    ".gltf": "import_scene.gltf",
    ".obj": "wm.obj_import",
    ".fbx": "import_scene.fbx",
    ".ply": "wm.ply_import",
    ".stl": "wm.stl_import",
    ".blend": "wm.open_mainfile",
    ".usdz": "wm.usd_import",
    ".usdc": "wm.usd_import",
    ".usd": "wm.usd_import",
}


def find_assets(root: Path) -> list[Path]:
    """Every file under ``root`` whose suffix is an input format, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMPORTERS)


def _load(path: Path) -> None:
    import bpy

    op_path = IMPORTERS[path.suffix.lower()]
    if op_path == "wm.open_mainfile":
        bpy.ops.wm.open_mainfile(filepath=str(path), load_ui=False)
        return
    bpy.ops.wm.read_factory_settings(use_empty=True)
    category, name = op_path.split(".")
    result = getattr(getattr(bpy.ops, category), name)(filepath=str(path))
    if "FINISHED" not in result:
        raise RuntimeError(f"{op_path} returned {result} for {path}")


def _is_hidden(obj) -> bool:
    """Hidden from render by the object's flags or by any collection it is in."""
    return (
        obj.hide_render
        or obj.hide_viewport
        or any(c.hide_render or c.hide_viewport for c in obj.users_collection)
    )


def _textures(meshes) -> list[dict]:
    found = {}
    for obj in meshes:
        for slot in obj.material_slots:
            if slot.material is None or slot.material.node_tree is None:
                continue
            for node in slot.material.node_tree.nodes:
                if node.type == "TEX_IMAGE" and node.image is not None and node.image.name not in found:
                    image = node.image
                    width, height = image.size
                    pixels = np.zeros(width * height * image.channels, np.float32)
                    if pixels.size:
                        image.pixels.foreach_get(pixels)
                    found[image.name] = {
                        "image": image.name,
                        "size": [width, height],
                        "packed": image.packed_file is not None,
                        "pixel_std": float(pixels.std()) if pixels.size else 0.0,
                    }
    return list(found.values())


def inspect_scene(path: Path) -> dict:
    """Import ``path`` into an empty scene and describe what the importer produced."""
    import bpy

    _load(path)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    objects = list(bpy.context.scene.objects)
    meshes = [o for o in objects if o.type == "MESH" and not _is_hidden(o)]
    world_points, n_faces, colour_attributes = [], 0, set()
    for obj in meshes:
        mesh = obj.evaluated_get(depsgraph).data
        co = np.zeros(len(mesh.vertices) * 3, np.float64)
        mesh.vertices.foreach_get("co", co)
        matrix = np.array(obj.matrix_world, np.float64)  # (4, 4) local -> world
        world_points.append(co.reshape(-1, 3) @ matrix[:3, :3].T + matrix[:3, 3])  # (V, 3)
        n_faces += len(mesh.polygons)
        colour_attributes.update(a.name for a in mesh.color_attributes)
    points = np.concatenate(world_points) if world_points else np.zeros((0, 3))
    # Sorted rounded rows: the same geometry in any vertex order gives the same digest.
    rounded = np.round(points, 4) + 0.0  # (+ 0.0 turns -0.0 into 0.0)
    rows = rounded[np.lexsort(rounded.T[::-1])] if len(points) else rounded
    return {
        "file": str(path),
        "importer": IMPORTERS[path.suffix.lower()],
        "mesh_objects": sorted(o.name for o in meshes),
        "faces": n_faces,
        "vertices": len(points),
        "bounds_min": points.min(0).tolist() if len(points) else None,
        "bounds_max": points.max(0).tolist() if len(points) else None,
        "hidden_objects": sorted(o.name for o in objects if _is_hidden(o)),
        "other_objects": sorted(f"{o.name}:{o.type}" for o in objects if o.type != "MESH"),
        "textures": _textures(meshes),
        "colour_attributes": sorted(colour_attributes),
        "geometry_digest": hashlib.sha256(rows.astype(np.float32).tobytes()).hexdigest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("assets", type=Path, nargs="?", default=Path(__file__).resolve().parent / "assets")
    parser.add_argument("--json", type=Path, help="write the report here (default: stdout)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with scratch_home():
        report = [inspect_scene(path.resolve()) for path in find_assets(args.assets)]
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text)
    else:
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
