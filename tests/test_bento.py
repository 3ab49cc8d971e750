"""`bentoml build` packs serving/ and exported/ with the serving dependencies only."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
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


BENTOML = Path(sys.executable).with_name("bentoml")
FACE = Path(__file__).parent / "data" / "face.jpg"


def build(repo_copy: Path, home: Path) -> str:
    """`bentoml build` in a BentoML home of its own; returns the Bento's tag."""
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run([str(BENTOML), "build", "--output", "tag"], cwd=repo_copy, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")


def served_answer(args: list[str], cwd: Path, home: Path, log: Path) -> dict:
    """Start `bentoml serve ARGS` on a free loopback port, POST the test face once (found and aligned), stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "AGEGROUP_THREADS": "1"}
    env.pop("AGEGROUP_MODEL_DIR", None)  # each serves the exported/ it carries
    with log.open("wb") as out:
        proc = subprocess.Popen([str(BENTOML), "serve", *args, "--host", "127.0.0.1", "--port", str(port)], cwd=cwd,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            else:
                pytest.fail(f"bentoml serve {args} did not start: {log.read_text()[-3000:]}")
            response = httpx.post(f"{url}/predict", files={"image": ("face.jpg", FACE.read_bytes(), "image/jpeg")},
                                  data={"gender": "1", "race": "2"}, timeout=30)
            assert response.status_code == 200, response.text
            return response.json()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_the_built_bento_served_by_tag_answers_like_the_checkout(repo_copy, tmp_path):
    home = tmp_path / "bentoml"
    tag = build(repo_copy, home)
    assert tag.startswith("agegroup:")
    elsewhere = tmp_path / "elsewhere"  # not the checkout: the Bento must carry all it serves
    elsewhere.mkdir()
    from_bento = served_answer([tag], elsewhere, home, tmp_path / "bento.log")
    from_checkout = served_answer([], repo_copy, home, tmp_path / "checkout.log")
    assert from_bento == from_checkout and from_bento["faces_found"] == 1
    bento = home / "bentos" / tag.split(":")[0] / tag.split(":")[1]
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()  # what `bentoml containerize` builds
    assert re.search(r"^FROM \S*python\S*", dockerfile, re.MULTILINE), dockerfile[:500]
    assert "requirements.txt" in dockerfile or "install.sh" in dockerfile
    assert "onnxruntime" in (bento / "env" / "python" / "requirements.txt").read_text()


def test_bento_holds_serving_and_model_only(repo_copy, tmp_path):
    build(repo_copy, tmp_path / "bentoml")
    [bento] = [p for p in (tmp_path / "bentoml" / "bentos" / "agegroup").iterdir() if p.name != "latest"]
    files = sorted(str(p.relative_to(bento / "src")) for p in (bento / "src").rglob("*") if p.is_file())
    assert {"serving/service.py", "exported/age_ensemble.onnx", "exported/age_ensemble.json"} <= set(files)
    assert all(f.startswith(("serving/", "exported/")) or f == "bentofile.yaml" for f in files), files
    assert not [f for f in files if f.endswith((".jpg", ".jpeg", ".png", ".pt"))]
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime" in requirements and "bentoml" in requirements
    assert not re.search(r"^(torch|torchvision|scikit-learn|matplotlib)\b", requirements, re.MULTILINE)
