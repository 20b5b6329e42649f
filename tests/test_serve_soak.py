"""A bounded soak test of ``dalle serve`` on loopback: 20 users at once for about 20 seconds.

Each user does what the page does: submit a generation, poll it until it is done, fetch
its images, now and then read ``/api/info`` and a static file, and on a full queue (503)
wait and try again.  The server must give no answer outside 200/202/503, finish every job
it accepted, and keep its memory bounded (finished jobs are forgotten past the limit).
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for helpers/, whatever pytest's import mode

from helpers.tiny_pipeline import build_tiny_pipeline  # noqa: E402

from dalle.serve import Limits, make_server  # noqa: E402

USERS = 20
SECONDS = float(os.environ.get("DALLE_SOAK_SECONDS", "20"))  # raise it for a longer soak by hand
MAX_RSS_GROWTH_MB = 300


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads memory from /proc (Linux)")
def test_twenty_users_for_a_while(one_thread):
    limits = Limits(max_queue=8, finished_jobs_kept=16)
    server = make_server(build_tiny_pipeline, "127.0.0.1", 0, limits=limits, quiet=True)
    assert server.server_address[0] == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = server.url.rstrip("/")
    statuses: Counter[int] = Counter()
    problems: list[str] = []
    done_jobs: list[int] = []
    lock = threading.Lock()
    stop = time.monotonic() + SECONDS

    def call(method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(base + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, data = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, data = e.code, e.read()
        with lock:
            statuses[status] += 1
            if status not in (200, 202, 503):
                problems.append(f"{method} {path}: {status} {data[:200]!r}")
        return status, data

    def user(k: int) -> None:
        rng = random.Random(k)
        try:
            while time.monotonic() < stop:
                body = json.dumps({"prompt": "a red circle", "candidates": rng.choice([1, 2, 4]), "keep": 1,
                                   "seed": rng.randrange(1000)}).encode()
                status, data = call("POST", "/api/generate", body)
                if status == 503:
                    time.sleep(rng.uniform(0.05, 0.3))
                    continue
                if status != 202:
                    return
                job = json.loads(data)
                while job["state"] in ("queued", "running"):
                    time.sleep(0.05)
                    status, data = call("GET", f"/api/jobs/{job['id']}")
                    if status != 200:
                        return
                    job = json.loads(data)
                if job["state"] != "done":
                    with lock:
                        problems.append(f"job {job['id']} ended {job['state']}: {job['error']}")
                    return
                for result in job["results"]:
                    call("GET", result["url"])
                if rng.random() < 0.3:
                    call("GET", "/api/info")
                    call("GET", "/app.js")
                with lock:
                    done_jobs.append(1)
        except Exception as e:  # noqa: BLE001 - a refused or reset connection is a failure to report
            with lock:
                problems.append(f"user {k}: {type(e).__name__}: {e}")

    try:
        warm = threading.Thread(target=user, args=(-1,))  # first jobs build the sampler: before measuring
        stop_warm, stop = stop, time.monotonic() + 1.0
        warm.start()
        warm.join()
        stop = stop_warm
        rss_before = _rss_mb()
        users = [threading.Thread(target=user, args=(k,)) for k in range(USERS)]
        for t in users:
            t.start()
        for t in users:
            t.join(timeout=SECONDS + 120)
        assert not any(t.is_alive() for t in users), "a user never finished"
        rss_after = _rss_mb()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    print(f"soak: {len(done_jobs)} jobs done in {SECONDS:.0f} s by {USERS} users; answers {dict(statuses)}; "
          f"RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    assert not problems, problems[:10]
    assert len(done_jobs) >= USERS  # every user got work through
    assert statuses[503] > 0  # the queue was full at times: the limit, not luck, kept the load bounded
    assert len(server.worker._jobs) <= limits.finished_jobs_kept + limits.max_queue + 1
    assert rss_after - rss_before < MAX_RSS_GROWTH_MB
