"""environment.yml (conda route) and pyproject.toml must name the same pinned dependencies."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    """Normalise the project name (PEP 503); keep the version specifier as written."""
    name, spec = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", req.strip()).groups()
    return re.sub(r"[-_.]+", "-", name.lower()) + spec


def _pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_norm(r) for r in reqs}


def _environment_requirements() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {_norm(r) for r in pip if not r.startswith("-")}


def test_same_dependencies_in_both_files():
    py, env = _pyproject_requirements(), _environment_requirements()
    assert py == env, f"only in pyproject: {sorted(py - env)}; only in environment.yml: {sorted(env - py)}"


def test_every_dependency_is_pinned():
    for req in _pyproject_requirements():
        assert "==" in req, f"{req} is not pinned with =="
    assert "torch==2.14.1" in _pyproject_requirements()
    assert "torchvision==0.29.1" in _pyproject_requirements()


def test_environment_installs_the_project_and_python_311():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-e ." in pip
