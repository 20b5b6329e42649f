"""HTTP-level tests of ``dalle serve`` against a real (tiny, randomly initialised) pipeline."""

from __future__ import annotations

import io
import json
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for helpers/, whatever pytest's import mode

from helpers.tiny_pipeline import build_tiny_pipeline, shapes_image  # noqa: E402

from dalle.serve import Limits, make_server  # noqa: E402

MAX_QUEUE = 2
MAX_UPLOAD = 200_000  # bytes; a 64 px PNG is a few KB


@pytest.fixture(scope="module")
def server():
    torch.set_num_threads(1)
    srv = make_server(build_tiny_pipeline, "127.0.0.1", 0,
                      limits=Limits(max_queue=MAX_QUEUE, max_upload_bytes=MAX_UPLOAD), quiet=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


# --- a small HTTP client -----------------------------------------------------------


def request(srv, method: str, path: str, body: bytes | None = None, content_type: str | None = None):
    """(status, headers, body bytes) for one request; 4xx/5xx are returned, not raised."""
    req = urllib.request.Request(srv.url.rstrip("/") + path, data=body, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def get_json(srv, path: str):
    status, _, body = request(srv, "GET", path)
    return status, json.loads(body)


def post_json(srv, path: str, data: dict):
    status, _, body = request(srv, "POST", path, json.dumps(data).encode(), "application/json")
    return status, json.loads(body)


def post_form(srv, path: str, fields: dict, files: dict[str, bytes]):
    boundary = uuid.uuid4().hex
    chunks = []
    for name, value in fields.items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, data in files.items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
                      f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    status, _, body = request(srv, "POST", path, b"".join(chunks), f"multipart/form-data; boundary={boundary}")
    return status, json.loads(body)


def wait_done(srv, job_id: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job = get_json(srv, f"/api/jobs/{job_id}")
        assert status == 200, job
        if job["state"] in ("done", "error"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job}")


def fetch_images(srv, job: dict) -> list[Image.Image]:
    images = []
    for result in job["results"]:
        status, headers, body = request(srv, "GET", result["url"])
        assert status == 200 and headers["Content-Type"] == "image/png"
        images.append(Image.open(io.BytesIO(body)).convert("RGB"))
    return images


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


# --- the page ------------------------------------------------------------------------


def test_page_static_files_and_info(server):
    status, headers, body = request(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'src="/app.js"' in body and b'href="/style.css"' in body
    for name, kind in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
        status, headers, body = request(server, "GET", name)
        assert status == 200 and headers["Content-Type"].startswith(kind) and len(body) > 500
    status, info = get_json(server, "/api/info")
    assert status == 200
    assert info["grid"] == server.pipeline.grid == 8 and info["image_size"] == 64
    assert info["limits"]["max_queue"] == MAX_QUEUE and info["reranker"] is True
    # Nothing outside dalle/web is reachable.
    for path in ("/serve.py", "/../pyproject.toml", "/%2e%2e/serve.py", "/api/nothing"):
        assert request(server, "GET", path)[0] == 404
    assert server.server_address[0] == "127.0.0.1"


# --- generation ----------------------------------------------------------------------


def test_generate_returns_kept_images_ranked_by_clip(server):
    params = {"prompt": "a red circle", "candidates": 6, "keep": 3, "temperature": 1.0, "top_k": 100, "seed": 7}
    status, job = post_json(server, "/api/generate", params)
    assert status == 202 and job["state"] in ("queued", "running", "done")
    job = wait_done(server, job["id"])
    assert job["state"] == "done", job["error"]
    assert job["progress"] == 1.0 and job["seed"] == 7
    scores = [r["score"] for r in job["results"]]
    assert [r["rank"] for r in job["results"]] == [0, 1, 2]
    assert scores == sorted(scores, reverse=True)
    images = fetch_images(server, job)
    assert all(im.size == (64, 64) for im in images)

    # The served images are exactly what the pipeline makes with the same settings: every
    # field reached it.  model_lock keeps the worker off the model meanwhile.
    with server.worker.model_lock:
        expected = server.pipeline("a red circle", candidates=6, keep=3, temperature=1.0, top_k=100, seed=7)
    assert all(same_pixels(a, b) for a, b in zip(images, expected.images))
    assert scores == pytest.approx(expected.scores)

    # Another seed gives other images.
    status, other = post_json(server, "/api/generate", {**params, "seed": 8})
    other = wait_done(server, other["id"])
    assert not same_pixels(fetch_images(server, other)[0], images[0])


def test_missing_seed_is_chosen_and_reported(server):
    status, job = post_json(server, "/api/generate", {"prompt": "a red circle", "candidates": 2, "keep": 1})
    assert status == 202
    job = wait_done(server, job["id"])
    assert job["state"] == "done" and isinstance(job["seed"], int) and job["seed"] >= 0


# --- completion ----------------------------------------------------------------------


def complete(server, image: Image.Image, **fields) -> dict:
    form = {"prompt": "a red circle above a blue square", "candidates": 4, "keep": 2, "seed": 3, **fields}
    status, job = post_form(server, "/api/complete", form, {"image": png_bytes(image)})
    assert status == 202, job
    job = wait_done(server, job["id"])
    assert job["state"] == "done", job["error"]
    return job


def test_completion_matches_the_pipeline(server):
    image = shapes_image()
    job = complete(server, image, mode="rows", keep_rows=3)
    assert job["params"]["keep_rows"] == 3 and len(job["results"]) == 2
    served = fetch_images(server, job)
    with server.worker.model_lock:
        expected = server.pipeline.complete(image, "a red circle above a blue square", keep_rows=3, candidates=4,
                                            keep=2, seed=3)
    assert all(same_pixels(a, b) for a, b in zip(served, expected.images))

    job = complete(server, image, mode="region", row=2, col=5)
    assert job["params"]["region"] == [2, 5]
    with server.worker.model_lock:
        expected = server.pipeline.complete(image, "a red circle above a blue square", region=(2, 5), candidates=4,
                                            keep=2, seed=3)
    assert all(same_pixels(a, b) for a, b in zip(fetch_images(server, job), expected.images))


def test_completion_keeps_the_uploaded_top_rows(server):
    """Only the kept token rows of the upload matter: uploads that agree there give the same completions."""
    keep_rows = 2
    a = shapes_image(bottom_colour=(30, 60, 220))
    b = shapes_image(bottom_colour=(20, 200, 40))  # differs only in the bottom quarter
    with server.worker.model_lock:
        tokens_a, tokens_b = server.pipeline.image_tokens(a)[0], server.pipeline.image_tokens(b)[0]
    # Preconditions of the test (fixed by the fixture's seed): same kept rows, other regenerated rows.
    assert torch.equal(tokens_a[:keep_rows], tokens_b[:keep_rows])
    assert not torch.equal(tokens_a[keep_rows:], tokens_b[keep_rows:])
    served_a = fetch_images(server, complete(server, a, mode="rows", keep_rows=keep_rows))
    served_b = fetch_images(server, complete(server, b, mode="rows", keep_rows=keep_rows))
    assert all(same_pixels(x, y) for x, y in zip(served_a, served_b))
    # Keeping more rows brings in the rows where the uploads differ.
    deeper = tokens_a.ne(tokens_b).any(dim=1).nonzero()[0].item() + 1
    served_a = fetch_images(server, complete(server, a, mode="rows", keep_rows=deeper))
    served_b = fetch_images(server, complete(server, b, mode="rows", keep_rows=deeper))
    assert not all(same_pixels(x, y) for x, y in zip(served_a, served_b))


# --- bad input -----------------------------------------------------------------------

GOOD = {"prompt": "a red circle", "candidates": 4, "keep": 2, "temperature": 1.0, "seed": 0}


@pytest.mark.parametrize("change, words", [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"prompt": "red circle " * 40}, "too long"),
    ({"prompt": "x" * 1001}, "1001 characters"),
    ({"keep": 5}, "at most the number of candidates"),
    ({"keep": 0}, "keep must be"),
    ({"candidates": 0}, "between 1 and 256"),
    ({"candidates": 257}, "between 1 and 256"),
    ({"candidates": "lots"}, "whole number"),
    ({"candidates": 2.5}, "whole number"),
    ({"temperature": 0}, "temperature must be above 0"),
    ({"temperature": 11}, "at most 10"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_k": 0}, "top-k must be between 1 and 512"),
    ({"top_p": 1.5}, "top-p"),
    ({"seed": -1}, "seed must be"),
])
def test_bad_generate_fields_get_a_clear_400(server, change, words):
    status, answer = post_json(server, "/api/generate", {**GOOD, **change})
    assert status == 400
    assert words in answer["error"]


def test_bad_bodies(server):
    status, _, body = request(server, "POST", "/api/generate", b"{not json", "application/json")
    assert status == 400 and b"not valid JSON" in body
    status, _, body = request(server, "POST", "/api/generate", b"[1, 2]", "application/json")
    assert status == 400 and b"JSON object" in body
    status, _, body = request(server, "POST", "/api/nope", b"{}", "application/json")
    assert status == 404


@pytest.mark.parametrize("fields, files, status_code, words", [
    ({"mode": "rows", "keep_rows": 3}, {"image": b"this is not an image"}, 400, "not an image"),
    ({"mode": "rows", "keep_rows": 3}, {"image": png_bytes(shapes_image())[:200]}, 400, "not an image"),
    ({"mode": "rows", "keep_rows": 3}, {}, 400, "choose an image file"),
    ({"mode": "rows", "keep_rows": 8}, {"image": png_bytes(shapes_image())}, 400, "rows to keep must be between 0 and 7"),
    ({"mode": "region", "row": 1, "col": 9}, {"image": png_bytes(shapes_image())}, 400, "region column"),
    ({"mode": "region", "row": 1}, {"image": png_bytes(shapes_image())}, 400, "row and column"),
    ({"mode": "paint"}, {"image": png_bytes(shapes_image())}, 400, "mode must be"),
    ({"mode": "rows", "keep_rows": 3}, {"image": png_bytes(Image.new("RGB", (5000, 10)))}, 400, "5000x10 pixels"),
    ({"mode": "rows", "keep_rows": 3}, {"image": b"\x89PNG" + bytes(MAX_UPLOAD)}, 413, "the limit is"),
    ({"mode": "rows", "keep_rows": 3}, {"image": bytes(3 * MAX_UPLOAD)}, 413, "the limit is"),
])
def test_bad_completion_gets_a_clear_message(server, fields, files, status_code, words):
    status, answer = post_form(server, "/api/complete", {**GOOD, **fields}, files)
    assert status == status_code
    assert words in answer["error"]


def test_unknown_job_and_image(server):
    assert get_json(server, "/api/jobs/0123456789abcdef")[0] == 404
    status, job = post_json(server, "/api/generate", {**GOOD, "keep": 1})
    wait_done(server, job["id"])
    assert request(server, "GET", f"/api/jobs/{job['id']}/images/1.png")[0] == 404
    assert request(server, "GET", f"/api/jobs/{job['id']}/images/0.png")[0] == 200


# --- queueing ------------------------------------------------------------------------


def test_concurrent_users_queue_in_order(server):
    """Two users at once: both jobs wait their turn (positions 1 and 2), then both finish."""
    answers = []
    with server.worker.model_lock:  # the model is busy: whatever arrives must wait
        barrier = threading.Barrier(2)

        def user(seed: int) -> None:
            barrier.wait()
            answers.append(post_json(server, "/api/generate", {**GOOD, "seed": seed}))

        users = [threading.Thread(target=user, args=(seed,)) for seed in (1, 2)]
        for t in users:
            t.start()
        for t in users:
            t.join()
        assert [status for status, _ in answers] == [202, 202]
        jobs = [job for _, job in answers]
        assert sorted(j["position"] for j in jobs) == [1, 2]
        assert all(j["state"] == "queued" for j in jobs)
        # Polling says the same; the second in line has one job ahead of it.
        polled = sorted((get_json(server, f"/api/jobs/{j['id']}")[1] for j in jobs), key=lambda j: j["position"])
        assert [(j["position"], j["ahead"]) for j in polled] == [(1, 0), (2, 1)]
    finished = [wait_done(server, j["id"]) for j in polled]
    assert [j["state"] for j in finished] == ["done", "done"]


def test_full_queue_answers_503(server):
    with server.worker.model_lock:
        accepted = [post_json(server, "/api/generate", {**GOOD, "seed": s}) for s in range(MAX_QUEUE)]
        assert [status for status, _ in accepted] == [202] * MAX_QUEUE
        status, answer = post_json(server, "/api/generate", GOOD)
        assert status == 503 and "queue is full" in answer["error"]
        status, info = get_json(server, "/api/info")
        assert info["queue"] == MAX_QUEUE
    for _, job in accepted:
        assert wait_done(server, job["id"])["state"] == "done"
    # Room again once the queue drains.
    status, job = post_json(server, "/api/generate", GOOD)
    assert status == 202 and wait_done(server, job["id"])["state"] == "done"


def test_serve_says_when_the_port_is_taken(server, tmp_path):
    from dalle.errors import UsageError
    from dalle.serve import serve

    server.pipeline.save_pretrained(tmp_path / "model")
    taken = server.server_address[1]
    with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{taken}.*choose another --port"):
        serve(model=tmp_path / "model", host="127.0.0.1", port=taken, device="cpu")


# --- hostile clients (issue 18) --------------------------------------------------------


def raw_request(srv, head: bytes, body: bytes = b"", half_close: bool = True, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``head`` + ``body`` on a raw socket (optionally half-closing it), return (status, answer body)."""
    host, port = srv.server_address[:2]
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(head + body)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed before taking everything: read its answer
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


def _head(length: str | None, path: str = "/api/generate", extra: str = "") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + extra + "\r\n\r\n").encode()


VALID_BODY = json.dumps({**GOOD, "candidates": 1, "keep": 1}).encode()


@pytest.mark.parametrize("length, status_code, words", [
    ("-1", 400, b"Content-Length must be a whole number"),  # was read to the end of the connection: 202
    ("1e3", 400, b"Content-Length must be a whole number"),
    (None, 411, b"needs a Content-Length"),
    (str(10**12), 413, b"the limit is"),
])
def test_a_body_with_a_bad_length_is_refused_before_it_is_read(server, length, status_code, words):
    padding = b" " * (MAX_UPLOAD // 2)  # still valid JSON: reading to the end of the connection accepted the job
    started = time.monotonic()
    status, body = raw_request(server, _head(length), VALID_BODY + padding)
    assert (status, words in body) == (status_code, True), body
    assert time.monotonic() - started < 5


def test_a_chunked_body_is_refused(server):
    status, body = raw_request(server, _head(None, extra="\r\nTransfer-Encoding: chunked"), b"5\r\nhello\r\n0\r\n\r\n")
    assert status == 411 and b"chunked" in body


def test_a_body_shorter_than_announced_is_refused(server):
    status, body = raw_request(server, _head(str(len(VALID_BODY) + 100)), VALID_BODY)  # then the socket half-closes
    assert status == 400 and b"ended after" in body


def test_clients_that_leave_early_print_no_traceback(server, capfd):
    """Clients that hang up mid-upload (the answer then meets a closed socket) or reset the connection:
    the server prints nothing and keeps serving (it printed a BrokenPipeError traceback for each)."""
    host, port = server.server_address[:2]
    for k in range(10):
        s = socket.create_connection((host, port))
        if k % 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        s.sendall(_head(str(2 * MAX_UPLOAD)) + b" " * 1000)
        s.close()
    time.sleep(0.5)
    assert get_json(server, "/api/info")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_prompt_in_an_unknown_script_is_refused_and_one_unknown_word_is_reported(server):
    status, answer = post_json(server, "/api/generate", {**GOOD, "prompt": "一个红色的圆圈"})
    assert status == 400 and "cannot read" in answer["error"] and "e.g." in answer["error"]
    status, job = post_json(server, "/api/generate", {**GOOD, "prompt": "a red 圆圈 circle", "candidates": 1, "keep": 1})
    assert status == 202 and "'圆圈'" in job["warning"]
    assert wait_done(server, job["id"])["state"] == "done"


def test_non_finite_numbers_are_refused(server):
    for field in ("temperature", "top_p"):
        status, answer = post_json(server, "/api/generate", {**GOOD, field: "nan"})
        assert status == 400 and "finite" in answer["error"], answer
