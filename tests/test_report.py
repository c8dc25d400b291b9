"""Tests of slatflow.report: a well-formed page with every section, built from an OUT tree."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from geometry_fixtures import check_asset_quality, cube, make_asset, sphere

from slatflow import quality, report
from slatflow.quarantine import record_failure

VOID = {"meta", "img", "br", "hr", "link", "input", "rect", "line", "path", "circle"}
GOOD, SHIFTED, FAILED = "a" * 64, "b" * 64, "f" * 64


class NestingChecker(HTMLParser):
    """Fails on a closing tag that does not match the open one; collects ids and images."""

    def __init__(self):
        super().__init__()
        self.stack, self.ids, self.images, self.errors = [], set(), [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()


def build_out_tree(out_dir) -> None:
    """Two checked assets (one with broken voxels), one failure, benchmark files, metadata."""
    make_asset(out_dir, GOOD, sphere(0.3, subdivisions=3))
    make_asset(out_dir, SHIFTED, cube(side=0.6), shifted_voxels=True)
    for sha256 in (GOOD, SHIFTED):
        check_asset_quality(out_dir, sha256, quality.QualitySettings(num_samples=5000))
    record_failure(out_dir, "render", FAILED, "Blender timed out after 600 s <script>", "logs/render/x.log")
    for rule, seconds in (("extract_mesh", [1.5, 2.5]), ("quality_check", [0.7, 0.9])):
        for sha, s in zip((GOOD, SHIFTED), seconds):
            path = out_dir / "benchmarks" / rule / f"{sha}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"s\th:m:s\tmax_rss\n{s}\t0:00:0{int(s)}\t100.0\n")
    index = pd.Index([GOOD, SHIFTED, FAILED], name="sha256")
    table = pd.DataFrame(
        {
            "rendered": [True, True, False],
            "voxelized": [True, True, False],
            "num_voxels": [1200, 2000, np.nan],
        },
        index=index,
    )
    table = pd.concat([table, quality.quality_columns(out_dir, index)], axis=1)
    table.to_csv(out_dir / "metadata.csv")


@pytest.fixture(scope="module")
def report_html(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("out")
    build_out_tree(out_dir)
    path = out_dir / "report" / "quality_report.html"
    report.write_report(path, out_dir, num_previews=3)
    return path


def test_report_is_well_formed_with_every_section(report_html):
    text = report_html.read_text()
    checker = NestingChecker()
    checker.feed(text)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert set(report.SECTIONS) <= checker.ids
    # 2 previewed assets x (3 renders missing but one 000.png, voxels, mesh)
    assert len(checker.images) == 6
    assert all(img["src"].startswith("data:image/png;base64,") for img in checker.images)
    assert "&lt;script&gt;" in text and "<script>" not in text  # reasons are escaped
    assert "voxel mesh F-score@0.01" in text  # the broken asset's reason
    assert "extract_mesh" in text and "quality_check" in text  # time per stage
    assert text.count("<svg") == len(report.HISTOGRAMS) + 2


def test_stage_counts_include_failures(tmp_path):
    build_out_tree(tmp_path)
    from slatflow.quarantine import load_failures

    record_failure(tmp_path, "features", GOOD, "out of memory")
    metadata = pd.read_csv(tmp_path / "metadata.csv", dtype={"sha256": str}).set_index("sha256")
    metadata["feature_dinov2_vitl14_reg"] = [False, True, False]
    metadata["feature_dinov2_vitl14_reg_random_weights"] = [False, True, False]
    rows = {
        stage: (done, failed)
        for stage, done, failed in report._stage_counts(metadata, tmp_path, load_failures(tmp_path))
    }
    assert rows["rendered"] == (2, 1) and rows["meshes"] == (2, 0) and rows["quality"] == (2, 0)
    assert rows["feature_dinov2_vitl14_reg"] == (1, 1)
    assert "feature_dinov2_vitl14_reg_random_weights" not in rows


def test_svg_histogram_counts_only_finite_values():
    svg = report.svg_histogram(np.array([0.0, 1.0, 1.0, np.nan]), "x")
    assert "(n=3)" in svg and svg.count("<rect") == 20
    assert "no values yet" in report.svg_histogram(np.array([]), "empty")


def test_previews_draw_something():
    image = report.mesh_preview(*sphere(0.3, subdivisions=3))
    pixels = np.asarray(image)
    assert pixels.shape == (report.PREVIEW_SIZE, report.PREVIEW_SIZE, 3)
    covered = (pixels != 250).any(axis=-1).mean()
    # a sphere of radius 0.3 covers pi 0.3^2 of the 1.8^2 frame
    assert covered == pytest.approx(np.pi * 0.09 / 1.8**2, rel=0.1)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(report_html, tmp_path):
    """The page renders in a real browser: the screenshot is not blank. Skipped only when
    chromium is missing (`apt-get install chromium`)."""
    from PIL import Image

    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1280,2400",
            report_html.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1280)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # text, histograms, previews


def test_benchmarks_of_model_stages_are_read_from_their_model_folders(tmp_path):
    for rule, sub, s in (("extract_mesh", "", 1.5), ("extract_features", "dinov2_vitl14_reg", 2.0)):
        path = tmp_path / "benchmarks" / rule / sub / f"{GOOD}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"s\th:m:s\n{s}\t0:00:01\n")
    seconds = report.read_benchmarks(tmp_path)
    assert set(seconds) == {"extract_mesh", "extract_features"}
    assert seconds["extract_features"].tolist() == [2.0]


def test_an_unreadable_output_becomes_a_tile_that_says_so(tmp_path):
    """A quarantined asset's truncated voxels, random-byte mesh and zero-byte render: the
    report is written and names each file's problem."""
    from PIL import Image

    build_out_tree(tmp_path)
    renders = tmp_path / "renders" / FAILED
    renders.mkdir(parents=True)
    Image.new("RGBA", (8, 8)).save(renders / "000.png")
    (renders / "001.png").write_bytes(b"")
    voxels = (tmp_path / "voxels" / f"{GOOD}.ply").read_bytes()
    (tmp_path / "voxels" / f"{FAILED}.ply").write_bytes(voxels[: len(voxels) // 2])
    (tmp_path / "meshes" / f"{FAILED}.ply").write_bytes(np.random.default_rng(0).bytes(4096))
    record_failure(tmp_path, "voxelize", FAILED, "truncated voxels")
    html_text = report.build_report(tmp_path, num_previews=3)
    checker = NestingChecker()
    checker.feed(html_text)
    assert not checker.errors
    block = html_text.split(f"<code>{FAILED}</code>", 1)[1].split('<div class="asset">', 1)[0]
    for name in ("001.png", f"{FAILED}.ply"):
        assert f"{name}<br/>unreadable: " in block, name
    assert block.count("unreadable: ") == 3, "the voxels, the mesh and the empty render"
    assert "render 000" in block, "the readable render is still drawn"
