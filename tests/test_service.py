"""The BentoML service over real HTTP on the tiny exported model: answers, 4xx cases, adaptive batching."""

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serving.image import MAX_UPLOAD_BYTES

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("wb")  # a file: an unread pipe would fill and block
    env = {**os.environ, "AGEGROUP_MODEL_DIR": str(tiny_export), "AGEGROUP_THREADS": "1"}
    bentoml = Path(sys.executable).with_name("bentoml")
    proc = subprocess.Popen([str(bentoml), "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"bentoml serve exited: {Path(log.name).read_text()[-3000:]}")
        time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("bentoml serve did not become ready in 120 s")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def jpeg(side: int = 60, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def post(url: str, image: bytes | None = b"", fields: dict | None = None, route: str = "/predict"):
    files = {"image": ("face.jpg", image, "image/jpeg")} if image is not None else None
    return httpx.post(url + route, files=files, data=fields if fields is not None else {"gender": "1", "race": "2"},
                      timeout=60)


def test_predict_returns_age_group_and_probabilities(server):
    response = post(server, jpeg())
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"age_group", "label", "probabilities"}
    assert list(body["probabilities"]) == ["10-19", "20-29", "30-39", "40-49", "50-60"]
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
    assert body["age_group"] == list(body["probabilities"])[body["label"]]
    assert body["age_group"] == max(body["probabilities"], key=body["probabilities"].get)


def huge_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (9000, 5000)).save(buffer, format="PNG")  # 45 MP of zeros: a small file
    return buffer.getvalue()


BAD_REQUESTS = [
    ("not an image", b"hello, I am text", None, 400, "not an image"),
    ("truncated", jpeg()[:300], None, 400, "truncated"),
    ("empty file", b"", None, 400, "empty"),
    ("huge in pixels", "huge_png", None, 400, "pixels"),
    ("huge in bytes", b"\xff" * (MAX_UPLOAD_BYTES + 1), None, 413, "limit"),
    ("gender 2", "jpeg", {"gender": "2", "race": "0"}, 400, "gender must be an integer 0-1"),
    ("gender -1", "jpeg", {"gender": "-1", "race": "0"}, 400, "gender"),
    ("race 5", "jpeg", {"gender": "0", "race": "5"}, 400, "race must be an integer 0-4"),
    ("race text", "jpeg", {"gender": "0", "race": "Asian"}, 400, "race"),
    ("gender fraction", "jpeg", {"gender": "0.5", "race": "1"}, 400, "gender"),
    ("missing race", "jpeg", {"gender": "1"}, 400, "race"),
    ("missing image", None, {"gender": "1", "race": "0"}, 400, "image"),
]


@pytest.mark.parametrize("name, image, fields, status, message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_gets_a_clear_4xx(server, name, image, fields, status, message):
    payload = {"jpeg": jpeg, "huge_png": huge_png}[image]() if isinstance(image, str) else image
    response = post(server, payload, fields)
    assert response.status_code == status, response.text
    assert message in response.text
    assert "Traceback" not in response.text


def test_json_body_instead_of_form_is_a_4xx(server):
    response = httpx.post(server + "/predict", json={"gender": 1, "race": 0}, timeout=30)
    assert 400 <= response.status_code < 500 and "Traceback" not in response.text


def test_stl10_endpoint_says_no_model_is_shipped(server):
    response = post(server, jpeg(), {}, route="/classify_image")
    assert response.status_code == 404 and "no STL-10 model" in response.text


def test_bentoml_endpoints_are_kept(server):
    for path in ("/healthz", "/livez", "/readyz", "/metrics", "/docs.json"):
        assert httpx.get(server + path, timeout=10).status_code == 200, path
    assert "/predict" in httpx.get(server + "/docs.json", timeout=10).json()["paths"]


def batch_histogram(server) -> tuple[float, float]:
    """(batches of size 1, all batches) so far, from BentoML's adaptive_batch_size metric."""
    text = httpx.get(server + "/metrics", timeout=10).text
    def value(pattern):
        found = re.search(pattern + r'\{[^}]*method_name="predict_age"[^}]*\} ([0-9.e+]+)', text)
        return float(found.group(1)) if found else 0.0
    ones = re.search(r'adaptive_batch_size_bucket\{le="1.0",[^}]*method_name="predict_age"[^}]*\} ([0-9.e+]+)', text)
    return (float(ones.group(1)) if ones else 0.0), value("bentoml_service_adaptive_batch_size_count")


def test_concurrent_requests_are_batched(server):
    ones_before, total_before = batch_histogram(server)
    image = jpeg(200)
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda i: post(server, image), range(96)))
    assert all(r.status_code == 200 for r in responses)
    assert len({r.text for r in responses}) == 1  # same input, same answer, whatever batch it rode in
    ones, total = batch_histogram(server)
    batches, single = total - total_before, ones - ones_before
    assert 0 < batches < 96, (batches, single)  # fewer onnxruntime runs than requests
    assert single < batches  # at least one run held more than one request
