"""Lint, format, the SLURM profile, and the conda env of every rule."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SNAKEMAKE

SAMPLE = ["--configfile", "config/sample.yaml"]


def test_snakemake_lint_is_clean():
    result = subprocess.run(SNAKEMAKE + ["--lint", *SAMPLE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_snakefmt_check_is_clean():
    smk = ["Snakefile", *sorted(str(p.relative_to(REPO)) for p in (REPO / "rules").glob("*.smk"))]
    result = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", *smk], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_slurm_profile_dry_run(tmp_path):
    """`snakemake --profile profiles/slurm -n features` plans SLURM jobs without SLURM.

    The profile deploys software with conda, and a dry-run asks `conda info`; where conda is
    not installed (CI, this machine: no conda channel is reachable) the same command runs
    with --sdm env-modules, which no rule uses, so everything else in the profile is checked.
    """
    target = "features" if "rule features" in _rule_sources() else "all"
    cmd = SNAKEMAKE + [target, "--profile", "profiles/slurm", "-n", *SAMPLE]
    if shutil.which("conda") is None:
        cmd += ["--sdm", "env-modules"]
    env_home = {"HOME": str(tmp_path)}
    import os

    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **env_home})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Using profiles profiles/slurm" in result.stderr


def _rule_sources() -> str:
    return "\n".join(p.read_text() for p in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))])


RULE_BLOCK = re.compile(r"^(?:rule|checkpoint) (\w+):\n((?:[ \t]+.*\n|\n)*)", re.MULTILINE)


def rules_with_actions() -> dict[str, dict[str, str]]:
    """rule name -> {'conda': env path, 'script': script path, 'log': ...} from the .smk files."""
    rules = {}
    for path in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        for name, body in RULE_BLOCK.findall(path.read_text() + "\n"):
            fields = {}
            for key in ("conda", "script", "shell", "run", "log", "notebook", "wrapper"):
                match = re.search(rf"^\s+{key}:\s*\n?\s*(.*)$", body, re.MULTILINE)
                if match:
                    fields[key] = match.group(1).strip().strip('"')
            rules[name] = fields
    return rules


# import name -> the package name in a conda env file (conda or pip)
PACKAGE_OF_IMPORT = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "skimage": "scikit-image",
    "mcubes": "pymcubes",
    "igl": "libigl",
    "torch": "pytorch",
    "sklearn": "scikit-learn",
    "cv2": "opencv",
    "huggingface_hub": "huggingface_hub",
}


def env_packages(env_file: Path) -> set[str]:
    spec = yaml.safe_load(env_file.read_text())
    names = set()
    for dep in spec["dependencies"]:
        items = dep["pip"] if isinstance(dep, dict) else [dep]
        for item in items:
            names.add(re.split(r"[=<>!~ \[]", item, maxsplit=1)[0].lower().replace("-gpu", ""))
    return names


def imported_modules(path: Path, seen: set[Path] | None = None) -> set[str]:
    """Top-level third-party modules imported by a file, following slatflow imports."""
    seen = set() if seen is None else seen
    if path in seen:
        return set()
    seen.add(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            top = name.split(".")[0]
            if top == "slatflow":
                module = REPO / Path(*name.split("."))
                for candidate in (module.with_suffix(".py"), module / "__init__.py"):
                    if candidate.is_file():
                        found |= imported_modules(candidate, seen)
            elif top not in sys.stdlib_module_names and top != "__future__":
                found.add(top)
    return found


def test_every_rule_with_an_action_has_a_log_and_a_conda_env():
    rules = rules_with_actions()
    acting = {name: f for name, f in rules.items() if {"script", "shell", "run"} & f.keys()}
    assert acting, "no rules found"
    for name, fields in acting.items():
        assert "log" in fields, f"rule {name} has no log"
        assert "conda" in fields, f"rule {name} has no conda env"
        assert (REPO / "rules" / fields["conda"]).resolve().is_file(), f"rule {name}: {fields['conda']} missing"


@pytest.mark.parametrize("rule", sorted(n for n, f in rules_with_actions().items() if "script" in f))
def test_the_conda_env_lists_what_the_script_imports(rule):
    fields = rules_with_actions()[rule]
    script = (REPO / "rules" / fields["script"]).resolve()
    packages = env_packages((REPO / "rules" / fields["conda"]).resolve())
    missing = sorted(
        m for m in imported_modules(script) if PACKAGE_OF_IMPORT.get(m, m).lower().replace("_", "-") not in
        {p.replace("_", "-") for p in packages}
    )
    assert not missing, f"rule {rule}: {fields['conda']} lacks {missing} (imported by {script.name})"
