"""`bentoml build` packs serving/ and exported/ with the serving dependencies only."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def requirement_lines(lines) -> list[str]:
    return sorted(re.sub(r"\s+", "", line.replace('"', "'")) for line in lines
                  if line.strip() and not line.lstrip().startswith("#"))


def test_bento_requirements_match_the_base_install():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    bento = (REPO / "serving" / "requirements.txt").read_text().splitlines()
    assert requirement_lines(project["dependencies"]) == requirement_lines(bento)
    assert not any("torch" in line for line in requirement_lines(bento))


@pytest.fixture
def repo_copy(tmp_path, tiny_export):
    """The repo's build inputs with the tiny model in exported/, plus decoys that must stay out of the Bento."""
    root = tmp_path / "repo"
    for name in ("serving", "training", "tests", "bench"):
        if (REPO / name).exists():
            shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "bentofile.yaml", root)
    shutil.copytree(tiny_export, root / "exported")
    (root / "data" / "images").mkdir(parents=True)
    (root / "data" / "images" / "face.jpg").write_bytes(b"\xff\xd8\xff")
    return root


def test_bento_holds_serving_and_model_only(repo_copy, tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    bentoml = Path(sys.executable).with_name("bentoml")
    result = subprocess.run([str(bentoml), "build", "--output", "tag"], cwd=repo_copy, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [bento] = [p for p in (tmp_path / "bentoml" / "bentos" / "agegroup").iterdir() if p.name != "latest"]
    files = sorted(str(p.relative_to(bento / "src")) for p in (bento / "src").rglob("*") if p.is_file())
    assert {"serving/service.py", "exported/age_ensemble.onnx", "exported/age_ensemble.json"} <= set(files)
    assert all(f.startswith(("serving/", "exported/")) or f == "bentofile.yaml" for f in files), files
    assert not [f for f in files if f.endswith((".jpg", ".jpeg", ".png", ".pt"))]
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime" in requirements and "bentoml" in requirements
    assert not re.search(r"^(torch|torchvision|scikit-learn|matplotlib)\b", requirements, re.MULTILINE)
