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
from conftest import face_pixels
from PIL import Image

from serving.image import MAX_UPLOAD_BYTES

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(env_extra: dict, log) -> tuple[subprocess.Popen, str]:
    """`bentoml serve` on a free loopback port, in its own process group, once /readyz says 200."""
    port = free_port()
    bentoml = Path(sys.executable).with_name("bentoml")
    proc = subprocess.Popen([str(bentoml), "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=REPO,
                            env={**os.environ, **env_extra}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"bentoml serve exited: {Path(log.name).read_text()[-3000:]}")
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("bentoml serve did not become ready in 120 s")


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("wb")  # a file: an unread pipe would fill and block
    proc, url = start_serve({"AGEGROUP_MODEL_DIR": str(tiny_export), "AGEGROUP_THREADS": "1",
                             "AGEGROUP_BODY_TIMEOUT_S": "2"}, log)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def jpeg(side: int = 100, seed: int = 0) -> bytes:
    """A face photo (the test face, with a little noise) as JPEG bytes."""
    noise = np.random.default_rng(seed).normal(0, 6, (side, side, 3))
    pixels = np.clip(face_pixels(side) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def encoded(pixels: np.ndarray, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind)
    return buffer.getvalue()


def post(url: str, image: bytes | None = b"", fields: dict | None = None, route: str = "/predict"):
    files = {"image": ("face.jpg", image, "image/jpeg")} if image is not None else None
    return httpx.post(url + route, files=files, data=fields if fields is not None else {"gender": "1", "race": "2"},
                      timeout=60)


def test_predict_returns_age_group_and_probabilities(server):
    response = post(server, jpeg())
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"age_group", "label", "probabilities", "age", "age_range", "face", "faces_found", "aligned",
                         "model_version"}
    assert body["model_version"].startswith("sha256:") and response.headers["X-Model-Version"] == body["model_version"]
    assert list(body["probabilities"]) == ["10-19", "20-29", "30-39", "40-49", "50-60"]
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
    assert body["age_group"] == list(body["probabilities"])[body["label"]]
    assert body["age_group"] == max(body["probabilities"], key=body["probabilities"].get)
    assert 10 <= body["age_range"][0] <= body["age"] <= body["age_range"][1] <= 60
    assert body["faces_found"] == 1 and body["aligned"] is False
    x, y, w, h = body["face"]["box"]
    assert 0 <= x < 50 and 0 <= y < 50 and 30 <= w <= 100 and 30 <= h <= 100 and body["face"]["score"] > 0


def test_a_face_in_a_photo_is_found_where_it_is(server):
    photo = np.full((480, 640, 3), 70, dtype=np.uint8)
    photo[200:400, 300:500] = face_pixels(200)  # the face fills the middle of the pasted 200 px square
    body = post(server, encoded(photo, "JPEG")).json()
    x, y, w, h = body["face"]["box"]
    assert abs(x + w / 2 - 400) < 15 and abs(y + h / 2 - 300) < 20 and 90 < w < 160, body
    assert body["faces_found"] == 1


def test_the_largest_of_several_faces_is_scored(server):
    photo = np.full((480, 640, 3), 200, dtype=np.uint8)
    photo[10:210, 10:210] = face_pixels(200)
    photo[200:470, 360:630] = face_pixels(270)
    body = post(server, encoded(photo)).json()
    assert body["faces_found"] == 2 and body["face"]["box"][0] > 360, body


def test_an_image_without_a_face_gets_a_422(server):
    for pixels in (np.full((300, 400, 3), 255, dtype=np.uint8),
                   np.random.default_rng(1).integers(0, 255, (240, 320, 3), dtype=np.uint8)):
        assert_error(post(server, encoded(pixels)), 422, "no face found in the image")


@pytest.mark.parametrize("shape", [(1, 10000), (10000, 1), (1, 1), (2, 3000)])
def test_strips_and_single_pixels_get_a_422_not_a_500(server, shape):
    pixels = np.random.default_rng(2).integers(0, 255, (*shape, 3), dtype=np.uint8)
    assert_error(post(server, encoded(pixels)), 422, "no face found in the image")
    assert post(server, encoded(pixels), {"gender": "1", "race": "2", "aligned": "true"}).status_code == 200


def test_aligned_crops_skip_detection(server):
    blank = encoded(np.full((80, 80, 3), 128, dtype=np.uint8))
    for value in ("true", "1", "TRUE"):
        response = post(server, blank, {"gender": "0", "race": "1", "aligned": value})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["aligned"] is True and body["face"] is None and body["faces_found"] is None
    detected = post(server, jpeg(), {"gender": "1", "race": "2", "aligned": "false"}).json()
    assert detected["aligned"] is False and detected["faces_found"] == 1


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
    ("missing image", None, {"gender": "1", "race": "0"}, 415, "multipart"),  # no file: httpx sends a plain form
    ("missing image in multipart", b"", {"gender": "1", "race": "0", "x": "y"}, 400, "unknown field(s) x"),
    ("gender true", "jpeg", {"gender": "true", "race": "0"}, 400, "gender must be an integer 0-1"),
    ("race true", "jpeg", {"gender": "0", "race": "true"}, 400, "race must be an integer 0-4"),
    ("unknown field", "jpeg", {"gender": "0", "race": "1", "age": "30"}, 400, "unknown field(s) age"),
    ("aligned yes", "jpeg", {"gender": "0", "race": "1", "aligned": "yes"}, 400, "aligned must be true or false"),
    ("aligned twice", "jpeg", {"gender": "0", "race": "1", "aligned": ["true", "false"]}, 400,
     "repeated field(s) aligned"),
]


def assert_error(response, status: int, message: str = "") -> None:
    """A 4xx in the API's one documented shape: {"error": "..."}."""
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body, dict) and list(body) == ["error"] and isinstance(body["error"], str), body
    assert message in body["error"] and "Traceback" not in response.text


@pytest.mark.parametrize("name, image, fields, status, message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_gets_a_clear_4xx(server, name, image, fields, status, message):
    payload = {"jpeg": jpeg, "huge_png": huge_png}[image]() if isinstance(image, str) else image
    assert_error(post(server, payload, fields), status, message)


def multipart(parts: list[tuple[str, str, bytes]], boundary: str = "b0undary") -> bytes:
    """(headers of the part, name, content) -> a raw multipart body, for requests httpx would not make."""
    chunks = [f"--{boundary}\r\n{headers}\r\n\r\n".encode() + content + b"\r\n" for headers, _, content in parts]
    return b"".join(chunks) + f"--{boundary}--\r\n".encode()


def file_part(filename: str, content: bytes) -> tuple[str, str, bytes]:
    return f'Content-Disposition: form-data; name="image"; filename="{filename}"', "image", content


def text_part(name: str, value: str) -> tuple[str, str, bytes]:
    return f'Content-Disposition: form-data; name="{name}"', name, value.encode()


DEMOGRAPHICS = [text_part("gender", "1"), text_part("race", "2")]
RAW_BAD_REQUESTS = [  # each gave a 500 (or fetched a URL) before serving/guard.py
    ("filename 300 bytes", "b0undary", [file_part("a" * 296 + ".jpg", jpeg())] + DEMOGRAPHICS, 200, ""),
    ("filename 100 CJK", "b0undary", [file_part("\u4e2d" * 100 + ".jpg", jpeg())] + DEMOGRAPHICS, 200, ""),
    ("empty filename", "b0undary", [file_part("", jpeg())] + DEMOGRAPHICS, 200, ""),
    ("image as text", "b0undary", [text_part("image", "hello")] + DEMOGRAPHICS, 400, "must be an uploaded file"),
    ("image as URL", "b0undary", [text_part("image", "http://127.0.0.1:9/x.jpg")] + DEMOGRAPHICS, 400,
     "URLs are not fetched"),
    ("image as file URL", "b0undary", [text_part("image", "file:///etc/passwd")] + DEMOGRAPHICS, 400,
     "must be an uploaded file"),
    ("two images", "b0undary", [file_part("a.jpg", jpeg()), file_part("b.jpg", jpeg())] + DEMOGRAPHICS, 400,
     "Too many files"),
    ("1,500 fields", "b0undary", [file_part("a.jpg", jpeg())] + [text_part(f"f{i}", "1") for i in range(1500)],
     400, "malformed multipart"),
    ("other boundary", "different", [file_part("a.jpg", jpeg())] + DEMOGRAPHICS, 400, "malformed multipart"),
]


@pytest.mark.parametrize("name, boundary, parts, status, message", RAW_BAD_REQUESTS,
                         ids=[c[0] for c in RAW_BAD_REQUESTS])
def test_raw_multipart_never_gets_a_5xx(server, name, boundary, parts, status, message):
    response = httpx.post(server + "/predict", content=multipart(parts),
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=30)
    if status == 200:
        assert response.status_code == 200 and "age_group" in response.json(), response.text
    else:
        assert_error(response, status, message)


@pytest.mark.parametrize("headers, content", [
    ({"Content-Type": "application/json"}, b'{"image": "http://127.0.0.1:9/x.jpg", "gender": 1, "race": 0}'),
    ({"Content-Type": "application/x-www-form-urlencoded"}, b"image=hello&gender=1&race=0"),
    ({"Content-Type": "multipart/form-data"}, b"no boundary at all"),
    ({"Content-Type": "text/plain"}, b"http://127.0.0.1:9/x.jpg"),
], ids=["json with URL", "urlencoded", "no boundary", "bare URL"])
def test_anything_but_a_multipart_upload_is_refused(server, headers, content):
    assert_error(httpx.post(server + "/predict", content=content, headers=headers, timeout=30), 415, "multipart")


def raw_http(url: str, head: bytes, body: bytes = b"", wait: float = 10.0) -> tuple[bytes, float]:
    """Send raw bytes, return (whatever the server answered, seconds it took)."""
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(head + body)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return answer, time.monotonic() - start


def test_oversize_body_is_refused_before_it_is_read(server):
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 300000000\r\n\r\n")
    answer, seconds = raw_http(server, head)  # no body is ever sent: the answer must not wait for it
    assert answer.startswith(b"HTTP/1.1 413") and b'"error"' in answer and seconds < 5, (answer[:200], seconds)


@pytest.mark.parametrize("extra_mb", [0.2, 12])
def test_chunked_body_is_cut_at_the_limit(server, extra_mb):
    """Past the limit the rest is read and dropped before the 413, so the answer is never lost to a reset."""
    boundary = "b0undary"
    body = multipart([file_part("a.jpg", b"\xff" * (MAX_UPLOAD_BYTES + int(extra_mb * 1e6)))] + DEMOGRAPHICS,
                     boundary)
    chunk = 1 << 20
    for _ in range(3):
        chunks = iter([body[i:i + chunk] for i in range(0, len(body), chunk)])  # no Content-Length: sent chunked
        response = httpx.post(server + "/predict", content=chunks,
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=60)
        assert_error(response, 413, "limit")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_get_a_json_405(server, method):
    response = httpx.request(method, server + "/predict", timeout=10)
    assert_error(response, 405, "takes POST")
    assert response.headers["allow"] == "POST"


def test_slow_upload_is_dropped_and_others_are_served(server):
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 5000\r\n\r\n")
    with ThreadPoolExecutor(20) as pool:
        slow = [pool.submit(raw_http, server, head, b"--b\r\n", 15) for _ in range(20)]
        time.sleep(0.5)
        start = time.monotonic()
        good = post(server, jpeg())
        assert good.status_code == 200 and time.monotonic() - start < 5
        for future in slow:  # the server timeout in this fixture is 2 s
            answer, seconds = future.result()
            assert answer.startswith(b"HTTP/1.1 408") and seconds < 8, (answer[:200], seconds)


def test_small_and_large_images_are_both_answered(server):
    """Small uploads are decoded on the event loop, large ones (over INLINE_DECODE_PIXELS) in a thread."""
    for side in (80, 800):
        response = post(server, encoded(face_pixels(side)))
        assert response.status_code == 200, response.text
        assert response.json()["age_group"] in ("10-19", "20-29", "30-39", "40-49", "50-60")


def test_model_endpoint_names_the_version(server):
    info = httpx.get(server + "/model", timeout=10).json()
    assert info["version"].startswith("sha256:") and len(info["version"]) == 7 + 64
    assert info["class_names"] == ["10-19", "20-29", "30-39", "40-49", "50-60"]
    assert info["members"] and {"name", "weight", "val_accuracy"} <= set(info["members"][0])
    assert info["outputs"] == ["probabilities", "label", "age", "age_range"]
    assert info["precision"] == "float32"  # the tiny export; the shipped one says int8
    assert info["validated_on"].endswith(" held-out faces")  # the shipped one: out of fold
    assert info["face_detection"]["available"] and "5_face_landmarks" in info["face_detection"]["landmarks"]
    assert post(server, jpeg()).json()["model_version"] == info["version"]


def test_schema_states_the_ranges(server):
    spec = httpx.get(server + "/docs.json", timeout=10).json()
    text = str(spec["components"]["schemas"])
    assert "'maximum': 1" in text and "'maximum': 4" in text, text[:2000]
    assert "aligned" in text and "face crop" in text


def test_readyz_answers_under_load(server):
    """Readiness comes from a background probe, so a busy server still answers it (bench/loadgen.py times it)."""
    image = jpeg(200)
    with ThreadPoolExecutor(40) as pool:
        load = [pool.submit(post, server, image) for _ in range(150)]
        for _ in range(10):
            assert httpx.get(server + "/readyz", timeout=10).status_code == 200
            time.sleep(0.1)
        assert all(f.result().status_code == 200 for f in load)


def test_no_upload_is_left_on_disk(server, tmp_path):
    import tempfile
    before = set(Path(tempfile.gettempdir()).glob("bentoml-request-*"))
    post(server, jpeg())
    assert set(Path(tempfile.gettempdir()).glob("bentoml-request-*")) <= before


def test_stl10_endpoint_says_no_model_is_shipped(server):
    response = post(server, jpeg(), {}, route="/classify_image")
    assert response.status_code == 404 and "no STL-10 model" in response.text


def test_workers_exit_when_serve_is_killed(tiny_export, tmp_path_factory):
    """kill -9 of `bentoml serve` must not leave its workers holding the port."""
    home = tmp_path_factory.mktemp("bentoml-home")  # its own metrics folder: the module's server keeps its own
    log = (home / "serve.log").open("wb")
    proc, _ = start_serve({"AGEGROUP_MODEL_DIR": str(tiny_export), "AGEGROUP_THREADS": "1",
                           "AGEGROUP_WORKERS": "2", "BENTOML_HOME": str(home)}, log)
    try:
        time.sleep(3)  # /readyz answered from one worker; let the others finish loading too
        workers = children_of(proc.pid)
        assert len(workers) >= 2, f"expected 2 workers, found {workers}"
        proc.kill()
        proc.wait()
        deadline = time.time() + 6
        while time.time() < deadline and any(alive(pid) for pid in workers):
            time.sleep(0.2)
        assert not any(alive(pid) for pid in workers), "workers outlived bentoml serve"
    finally:
        if alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in children_of(proc.pid):
            os.kill(pid, signal.SIGKILL)
        log.close()


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and int(fields[1]) == pid:  # after the name: state, then parent pid
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_bentoml_endpoints_are_kept(server):
    for path in ("/healthz", "/livez", "/readyz", "/metrics", "/docs.json"):
        assert httpx.get(server + path, timeout=10).status_code == 200, path
    assert "/predict" in httpx.get(server + "/docs.json", timeout=10).json()["paths"]


def batch_histogram(server) -> tuple[float, float]:
    """(batches of size 1, all batches) so far, from BentoML's adaptive_batch_size metric."""
    text = httpx.get(server + "/metrics", timeout=10).text
    def total(pattern):  # summed over every series (workers, label sets) of the metric
        return sum(float(v) for v in re.findall(pattern + r'\{[^}]*method_name="predict_age"[^}]*\} ([0-9.e+]+)', text))
    ones = sum(float(v) for v in re.findall(
        r'adaptive_batch_size_bucket\{le="1.0",[^}]*method_name="predict_age"[^}]*\} ([0-9.e+]+)', text))
    return ones, total("bentoml_service_adaptive_batch_size_count")


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


def server_errors(server) -> float:
    """5xx answers counted so far on /predict by BentoML's request counter."""
    text = httpx.get(server + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r'request_total\{[^}]*endpoint="/predict"[^}]*http_response_code="5\d\d"'
                                            r'[^}]*\} ([0-9.e+]+)', text))


def test_client_disconnects_are_not_counted_as_server_errors(server):
    before = server_errors(server)
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 5000\r\n\r\n")
    host, port = server.removeprefix("http://").split(":")
    for _ in range(5):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(head + b"--b\r\n")  # then hang up mid-body
    time.sleep(1)
    assert post(server, jpeg()).status_code == 200
    assert server_errors(server) == before


def test_serve_stops_within_seconds_whatever_uploads_are_in_flight(tiny_export, tmp_path_factory):
    """SIGTERM while some clients stall mid-upload and others abandoned theirs: out within 5 s, each logged."""
    home = tmp_path_factory.mktemp("bentoml-home-term")
    log_path = home / "serve.log"
    with log_path.open("wb") as log:
        proc, url = start_serve({"AGEGROUP_MODEL_DIR": str(tiny_export), "BENTOML_HOME": str(home)}, log)
        port = int(url.rsplit(":", 1)[1])
        head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 50000\r\n\r\n" + b"x" * 1000)
        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        abandoned = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for s in stalled + abandoned:
            s.sendall(head)
        time.sleep(0.5)
        for s in abandoned:
            s.close()
        time.sleep(0.5)
        start = time.time()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            for s in stalled:
                s.close()
        took = time.time() - start
    text = log_path.read_text()
    assert took < 5, f"serve took {took:.1f} s to stop"
    assert text.count("abandoned by the client") == 3, text[-3000:]
