"""``dalle serve``: a local web page to generate and complete images.

Built on the standard library rather than Gradio: ``ThreadingHTTPServer`` answers
requests on many threads, a small JSON API takes jobs, and one static page with
plain JavaScript (``dalle/web/``) drives it -- no extra dependency, no build step.

One worker thread owns the model and runs jobs one at a time in arrival order, so
concurrent users wait in a queue (and see their place in it) instead of running two
samplings at once and running out of memory.  The page polls ``GET /api/jobs/<id>``
for the state, queue position, progress and results.

API (all answers JSON unless noted; errors are ``{"error": message}``):

``GET  /api/info``                      model facts, limits and defaults for the form
``POST /api/generate``                  JSON ``{prompt, candidates, keep, temperature, top_k, top_p, guidance, seed}``
                                        -> 202 ``{id, state, position, ...}``
``POST /api/complete``                  multipart form: the same fields, ``image`` (a file),
                                        ``mode`` = ``rows`` (with ``keep_rows``) or ``region``
                                        (with ``row``, ``col``) -> 202
``GET  /api/jobs/<id>``                 the job: ``state`` (queued/running/done/error), ``position``,
                                        ``ahead``, ``progress``, ``results`` [{url, score, rank}], ``error``
``GET  /api/jobs/<id>/images/<k>.png``  the k-th kept image (PNG)

Bad input is answered 400 with a message that says what to fix, a full queue 503,
an upload over the size limit 413.
"""

from __future__ import annotations

import email.parser
import email.policy
import inspect
import io
import json
import math
import re
import secrets
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from dalle.errors import UsageError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


@dataclass(frozen=True)
class Limits:
    """What one request may ask for.  The page reads these from ``/api/info``."""

    max_queue: int = 16  # jobs waiting (the running one not counted); more -> 503
    max_upload_bytes: int = 10 * 2**20  # an uploaded image file; more -> 413
    max_image_side: int = 4096  # pixels, checked before decoding (decompression bombs)
    max_candidates: int = 256
    max_temperature: float = 10.0
    max_guidance: float = 20.0  # classifier-free guidance scale (1 = none)
    max_prompt_chars: int = 1000  # checked before tokenizing; the token limit is the model's
    finished_jobs_kept: int = 32  # finished jobs whose images stay fetchable

    @property
    def max_body_bytes(self) -> int:
        # Room for the multipart envelope and the form fields around the image.
        return self.max_upload_bytes + 64 * 1024


class RequestError(Exception):
    """A request the server refuses; ``message`` is shown to the user as is."""

    def __init__(self, status: int, message: str, drain: int = 0):
        super().__init__(message)
        self.status = status
        self.message = message
        self.drain = drain  # bytes of an unread body to drop after answering (a refused upload)


# --- validation --------------------------------------------------------------------------


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and value.strip() == "")


def _parse_int(fields: dict[str, Any], name: str, label: str, lo: int, hi: int | None,
               default: int | None = None) -> int | None:
    value = fields.get(name)
    if not _present(value):
        return default
    range_text = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = int(value.strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise RequestError(400, f"{label} must be a whole number {range_text}, got {value!r}") from None
    if number < lo or (hi is not None and number > hi):
        raise RequestError(400, f"{label} must be {range_text}, got {number}")
    return number


def _parse_float(fields: dict[str, Any], name: str, label: str, default: float | None = None) -> float | None:
    value = fields.get(name)
    if not _present(value):
        return default
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise RequestError(400, f"{label} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise RequestError(400, f"{label} must be a finite number, got {value!r}")
    return number


@dataclass
class SamplingParams:
    """The validated knobs of one job (the names of ``DallePipeline``'s keywords)."""

    prompt: str
    candidates: int
    keep: int
    seed: int
    temperature: float
    top_k: int | None
    top_p: float | None
    guidance: float = 1.0
    warning: str | None = None  # about the prompt (words the model cannot read); shown with the results

    def pipeline_kwargs(self) -> dict[str, Any]:
        return dict(candidates=self.candidates, keep=self.keep, seed=self.seed, temperature=self.temperature,
                    top_k=self.top_k, top_p=self.top_p, guidance=self.guidance)


def validate_sampling(fields: dict[str, Any], limits: Limits, count_tokens: Callable[[str], tuple[int, int]] | None,
                      image_vocab: int | None, guidable: bool = True,
                      check_words: Callable[[str], tuple[str | None, str | None]] | None = None) -> SamplingParams:
    """Check the form fields shared by both tabs; raise :class:`RequestError` (400) naming the first bad one.

    ``count_tokens(prompt) -> (tokens, text_len)`` lets a prompt the model would cut short be refused
    with the numbers, instead of silently generating images for half a sentence.  ``guidable``:
    whether the model was trained with null captions (else only guidance 1 is accepted).
    """
    prompt = fields.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise RequestError(400, "the prompt must be text")
    prompt = (prompt or "").strip()
    if not prompt:
        raise RequestError(400, "the prompt is empty: write what the image should show, e.g. \"a red circle\"")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(400, f"the prompt is {len(prompt)} characters long; shorten it to at most "
                                f"{limits.max_prompt_chars}")
    if count_tokens is not None:
        n_tokens, text_len = count_tokens(prompt)
        if n_tokens > text_len:
            raise RequestError(400, f"the prompt is too long: it makes {n_tokens} text tokens but the model reads "
                                    f"at most {text_len}; shorten it by about {n_tokens - text_len} words")
    warning = None
    if check_words is not None:  # most words unreadable (another script): refused; a few: a warning
        error, warning = check_words(prompt)
        if error:
            raise RequestError(400, error)
    candidates = _parse_int(fields, "candidates", "candidates", 1, limits.max_candidates, default=32)
    keep = _parse_int(fields, "keep", "keep", 1, None, default=min(4, candidates))
    if keep > candidates:
        raise RequestError(400, f"keep ({keep}) must be at most the number of candidates ({candidates}): "
                                f"the best {keep} are chosen among the candidates")
    temperature = _parse_float(fields, "temperature", "temperature", default=1.0)
    if not 0.0 < temperature <= limits.max_temperature:
        raise RequestError(400, f"temperature must be above 0 and at most {limits.max_temperature:g}, got {temperature:g}")
    top_k = _parse_int(fields, "top_k", "top-k", 1, image_vocab)
    top_p = _parse_float(fields, "top_p", "top-p")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise RequestError(400, f"top-p must be above 0 and at most 1, got {top_p:g}")
    guidance = _parse_float(fields, "guidance", "guidance", default=1.0)
    if not 0.0 <= guidance <= limits.max_guidance:
        raise RequestError(400, f"guidance must be between 0 and {limits.max_guidance:g} (1 = none), got {guidance:g}")
    if guidance != 1 and not guidable:
        raise RequestError(400, f"guidance {guidance:g} needs a model trained with null captions, and this one was "
                                "not: set guidance to 1")
    seed = _parse_int(fields, "seed", "seed", 0, 2**63 - 1)
    if seed is None:  # no seed given: pick one and report it, so the result can be reproduced
        seed = secrets.randbelow(2**31)
    return SamplingParams(prompt, candidates, keep, seed, temperature, top_k, top_p, guidance, warning)


def validate_completion(fields: dict[str, Any], grid: int) -> dict[str, Any]:
    """``keep_rows=`` or ``region=`` keyword for ``DallePipeline.complete`` from the form's mode fields."""
    mode = str(fields.get("mode") or "rows").strip()
    if mode == "rows":
        rows = _parse_int(fields, "keep_rows", "rows to keep", 0, grid - 1)
        if rows is None:
            raise RequestError(400, f"say how many token rows to keep (0 to {grid - 1} of the {grid}x{grid} grid)")
        return {"keep_rows": rows}
    if mode == "region":
        row = _parse_int(fields, "row", "region row", 0, grid - 1)
        col = _parse_int(fields, "col", "region column", 0, grid - 1)
        if row is None or col is None:
            raise RequestError(400, f"give the region's top-left token as row and column (0 to {grid - 1})")
        return {"region": (row, col)}
    raise RequestError(400, f"mode must be 'rows' (keep the top rows) or 'region' (regenerate a rectangle), got {mode!r}")


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """An uploaded file as an RGB image, or a 400 that says why it cannot be used."""
    if not data:
        raise RequestError(400, "choose an image file to complete (PNG or JPEG)")
    if len(data) > limits.max_upload_bytes:
        raise RequestError(413, f"the image file is {len(data) / 2**20:.1f} MB; the limit is "
                                f"{limits.max_upload_bytes / 2**20:.0f} MB")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            w, h = opened.size  # read from the header, before any pixel is decoded
            if max(w, h) > limits.max_image_side:
                raise RequestError(400, f"the image is {w}x{h} pixels; the limit is {limits.max_image_side} "
                                        f"pixels a side (it is resized to the model's size anyway)")
            opened.load()
            return opened.convert("RGB")
    except RequestError:
        raise
    except Exception:  # any decoding failure means the same thing to the user
        raise RequestError(400, "the uploaded file is not an image this server can read; "
                                "upload a PNG or JPEG file") from None


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, bytes]]:
    """``multipart/form-data`` -> (text fields, file fields' bytes)."""
    head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise RequestError(400, "send the completion as multipart/form-data (a form with a file field 'image')")
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files[str(name)] = payload
        else:
            fields[str(name)] = payload.decode("utf-8", errors="replace")
    return fields, files


# --- jobs and the worker -----------------------------------------------------------------


@dataclass(eq=False)  # jobs are compared by identity (queue look-ups), not field by field
class Job:
    kind: str  # "generate" or "complete"
    params: SamplingParams
    completion: dict[str, Any] = field(default_factory=dict)  # keep_rows= or region=
    image: Image.Image | None = None
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    state: str = "queued"  # queued -> running -> done | error
    progress: float | None = 0.0  # None while running without a progress callback: unknown
    pngs: list[bytes] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    error: str | None = None
    started: float | None = None
    finished: float | None = None


def _accepts_keyword(fn: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Worker:
    """Runs jobs on the pipeline one at a time, first come first served.

    ``model_lock`` is held while the model runs; anything else that must use the
    pipeline (or hold the queue still) takes it too.
    """

    def __init__(self, pipeline: Any, limits: Limits):
        self.pipeline = pipeline
        self.limits = limits
        self.model_lock = threading.Lock()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._running: Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="dalle-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise RequestError(503, "the server is shutting down")
            if len(self._waiting) >= self.limits.max_queue:
                raise RequestError(503, f"the queue is full ({len(self._waiting)} jobs are waiting); "
                                        f"try again in a minute")
            self._waiting.append(job)
            self._jobs[job.id] = job
            self._cond.notify_all()

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def queue_length(self) -> int:
        with self._cond:
            return len(self._waiting) + (self._running is not None)

    def describe(self, job: Job) -> dict[str, Any]:
        """The job as the page sees it."""
        with self._cond:
            position = self._waiting.index(job) + 1 if job.state == "queued" else 0
            ahead = position - 1 + (self._running is not None) if job.state == "queued" else 0
            now = time.monotonic()
            return {
                "id": job.id,
                "kind": job.kind,
                "state": job.state,
                "position": position,  # 1 = next to run; 0 = not waiting
                "ahead": ahead,  # jobs that run before this one, the running one included
                "progress": job.progress,
                "prompt": job.params.prompt,
                "params": {**job.params.pipeline_kwargs(), **{k: list(v) if isinstance(v, tuple) else v
                                                               for k, v in job.completion.items()}},
                "seed": job.params.seed,
                "error": job.error,
                "warning": job.params.warning,
                "elapsed": round((job.finished or now) - (job.started or now), 3),
                "results": [{"rank": k, "score": s, "url": f"/api/jobs/{job.id}/images/{k}.png"}
                            for k, s in enumerate(job.scores)] if job.state == "done" else [],
            }

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            with self.model_lock:
                with self._cond:
                    if not self._waiting:
                        continue
                    job = self._waiting.popleft()
                    job.state, job.started = "running", time.monotonic()
                    self._running = job
                self._run(job)
                with self._cond:
                    job.finished = time.monotonic()
                    self._running = None
                    self._forget_old()

    def _run(self, job: Job) -> None:
        pipe = self.pipeline
        fn = pipe.complete if job.kind == "complete" else pipe
        kwargs = job.params.pipeline_kwargs()
        if _accepts_keyword(fn, "progress_callback"):
            def report(done: int, total: int) -> None:
                job.progress = done / total if total else None
            kwargs["progress_callback"] = report
        else:
            job.progress = None  # the page shows an indeterminate bar
        try:
            if job.kind == "complete":
                result = pipe.complete(job.image, job.params.prompt, **job.completion, **kwargs)
            else:
                result = pipe(job.params.prompt, **kwargs)
            pngs = [_png(image) for image in result.images]
            scores = [float(s) for s in result.scores]
        except ValueError as e:  # the pipeline's own checks: a message for the user
            job.error, job.state = str(e), "error"
        except Exception as e:  # a bug or an exhausted device: keep serving the others
            traceback.print_exc(file=sys.stderr)
            job.error, job.state = f"the model failed on this job ({type(e).__name__}: {e})", "error"
        else:
            job.pngs, job.scores, job.progress, job.state = pngs, scores, 1.0, "done"
        finally:
            job.image = None  # the upload is no longer needed

    def _forget_old(self) -> None:
        """Drop the oldest finished jobs past ``finished_jobs_kept`` (their images live in memory)."""
        finished = [j for j in self._jobs.values() if j.state in ("done", "error")]
        for job in finished[: max(0, len(finished) - self.limits.finished_jobs_kept)]:
            del self._jobs[job.id]


# --- HTTP ----------------------------------------------------------------------------------

_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
_STATIC_NAME = re.compile(r"^/([a-z0-9_-]+\.(?:html|js|css|png|svg))$")
_JOB = re.compile(r"^/api/jobs/([0-9a-f]{16})$")
_JOB_IMAGE = re.compile(r"^/api/jobs/([0-9a-f]{16})/images/(\d+)\.png$")


# Next to this module rather than through importlib.resources: the package is never imported
# from a zip, and a stale editable install can make importlib.resources see a namespace package.
WEB_DIR = Path(__file__).resolve().with_name("web")


class DalleServer(ThreadingHTTPServer):
    """The HTTP server plus the one worker that owns the pipeline."""

    daemon_threads = True  # a stuck client must not keep the process alive
    # Connections waiting to be accepted.  socketserver's default of 5 overflowed under the soak
    # test's 20 users on 2 busy cores: the kernel dropped handshakes and clients saw resets.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], pipeline: Any, limits: Limits, quiet: bool = False):
        self.pipeline = pipeline
        self.limits = limits
        self.quiet = quiet
        self.worker = Worker(pipeline, limits)  # before binding: a failed bind calls server_close()
        super().__init__(address, _Handler)
        self.worker.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def server_close(self) -> None:
        self.worker.close()
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that left early (broken pipe, reset, timeout) is normal: no traceback for it."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    # Model facts the form needs; read defensively so a pipeline-like object also works.
    def info(self) -> dict[str, Any]:
        pipe = self.pipeline
        tokenizer = getattr(pipe, "tokenizer", None)
        return {
            "grid": pipe.grid,
            "image_size": pipe.image_size,
            "text_len": getattr(tokenizer, "text_len", None),
            "image_vocab": self.image_vocab(),
            "reranker": getattr(pipe, "clip", None) is not None,
            "guidance": self.guidable(),
            "device": str(getattr(pipe, "device", "")),
            "queue": self.worker.queue_length(),
            "limits": {"max_queue": self.limits.max_queue, "max_upload_bytes": self.limits.max_upload_bytes,
                       "max_candidates": self.limits.max_candidates, "max_temperature": self.limits.max_temperature,
                       "max_guidance": self.limits.max_guidance, "max_prompt_chars": self.limits.max_prompt_chars},
            "defaults": {"candidates": 32, "keep": 4, "temperature": 1.0, "top_k": None, "guidance": 1.0, "seed": 0},
        }

    def guidable(self) -> bool:
        """Whether the model was trained with null captions (classifier-free guidance other than 1)."""
        transformer = getattr(self.pipeline, "transformer", None)
        return getattr(getattr(transformer, "config", None), "null_caption_fraction", 0.0) > 0

    def image_vocab(self) -> int | None:
        transformer = getattr(self.pipeline, "transformer", None)
        return getattr(getattr(transformer, "config", None), "image_vocab", None)

    def check_words(self) -> Callable[[str], tuple[str | None, str | None]] | None:
        tokenizer = getattr(self.pipeline, "tokenizer", None)
        if tokenizer is None or not hasattr(tokenizer, "unknown_words"):
            return None
        from dalle.pipeline import prompt_word_problem

        return lambda prompt: prompt_word_problem(tokenizer, prompt)

    def count_tokens(self) -> Callable[[str], tuple[int, int]] | None:
        tokenizer = getattr(self.pipeline, "tokenizer", None)
        if tokenizer is None or not hasattr(tokenizer, "encode_with_info"):
            return None

        def count(prompt: str) -> tuple[int, int]:
            # encode_with_info pads to text_len and says how many tokens it had to cut.
            _, cut = tokenizer.encode_with_info(prompt)
            return tokenizer.text_len + cut, tokenizer.text_len

        return count


_CONTENT_LENGTH = re.compile(r"[0-9]{1,15}")
DRAIN_TIMEOUT_S = 2.0  # at most this long reading (and dropping) a refused upload


class _Handler(BaseHTTPRequestHandler):
    server: DalleServer
    server_version = "dalle-serve"
    timeout = 30  # seconds a socket may sit idle (a slow or stalled client) before it is closed

    # -- plumbing --

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Polling makes a request every fraction of a second: log only the failures.
        if not self.server.quiet and str(code)[:1] in "45":
            super().log_request(code, size)

    def log_error(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_error(format, *args)

    def _send(self, status: int, body: bytes, content_type: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "private, max-age=3600" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: dict[str, Any]) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _read_body(self) -> bytes:
        """The request body, bounded: its length is checked before a byte of it is read.

        A missing, malformed, negative or oversized ``Content-Length`` (and chunked bodies,
        which announce none) is refused first; a body shorter than announced (a client that
        half-closed its socket) is refused too.  Reading stops at the announced length, and
        the socket's timeout (:attr:`timeout`) bounds how long a slow client can hold a thread.
        """
        limit = self.server.limits.max_body_bytes
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError(411, "send the body with a Content-Length header (chunked bodies are not accepted)",
                               drain=limit)
        text = (self.headers.get("Content-Length") or "").strip()
        if not text:
            self.close_connection = True
            raise RequestError(411, "the request needs a Content-Length header", drain=limit)
        if not _CONTENT_LENGTH.fullmatch(text):
            self.close_connection = True
            raise RequestError(400, f"Content-Length must be a whole number of bytes, got {text[:40]!r}", drain=limit)
        length = int(text)
        if length > limit:
            self.close_connection = True
            raise RequestError(413, f"the upload is {length / 2**20:.1f} MB; the limit is "
                                    f"{self.server.limits.max_upload_bytes / 2**20:.0f} MB",
                               drain=min(length, 4 * limit))
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            raise RequestError(400, f"the body ended after {len(body)} of the {length} bytes its Content-Length "
                                    f"announced")
        return body

    def _drain(self, size: int) -> None:
        """Read and drop up to ``size`` bytes of a refused upload, briefly, so the client sees the answer."""
        try:
            self.connection.settimeout(DRAIN_TIMEOUT_S)
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while size > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(size, 1 << 16)) if hasattr(self.rfile, "read1") else b""
                if not chunk:
                    break
                size -= len(chunk)
        except OSError:
            pass

    def _dispatch(self, routes: Callable[[], None]) -> None:
        try:
            try:
                routes()
            except RequestError as e:
                self._error(e.status, e.message)
                if e.drain:
                    self._drain(e.drain)
            except TimeoutError:
                self.close_connection = True
                self._error(408, f"the request body did not arrive within {self.timeout:g} s")
            except Exception as e:  # pragma: no cover - a bug; keep the server up and say so
                if isinstance(e, ConnectionError):
                    raise
                traceback.print_exc(file=sys.stderr)
                self._error(500, f"internal error: {type(e).__name__}: {e}")
        except ConnectionError:  # the client left (broken pipe, reset), even while we answered
            self.close_connection = True

    # -- routes --

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/":
            path = "/index.html"
        if path == "/api/info":
            return self._json(200, self.server.info())
        if m := _JOB.match(path):
            job = self._job(m.group(1))
            return self._json(200, self.server.worker.describe(job))
        if m := _JOB_IMAGE.match(path):
            job = self._job(m.group(1))
            k = int(m.group(2))
            if job.state != "done" or k >= len(job.pngs):
                raise RequestError(404, f"job {job.id} has no image {k}")
            return self._send(200, job.pngs[k], "image/png", cache=True)
        if (m := _STATIC_NAME.match(path)) and (resource := WEB_DIR / m.group(1)).is_file():
            suffix = Path(m.group(1)).suffix
            return self._send(200, resource.read_bytes(), _STATIC_TYPES[suffix])
        if path.startswith("/api/"):
            raise RequestError(404, f"no such API endpoint: GET {path}")
        raise RequestError(404, f"no page at {path}")

    def _job(self, job_id: str) -> Job:
        job = self.server.worker.get(job_id)
        if job is None:
            raise RequestError(404, f"no job {job_id}: it never existed or finished long ago "
                                    f"(the server keeps the last {self.server.limits.finished_jobs_kept})")
        return job

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/api/generate", "/api/complete"):
            raise RequestError(404, f"no such API endpoint: POST {path}")
        body = self._read_body()
        content_type = self.headers.get("Content-Type", "")
        files: dict[str, bytes] = {}
        if content_type.startswith("multipart/form-data"):
            fields, files = parse_multipart(body, content_type)
        elif content_type.startswith("application/json") or not content_type:
            try:
                fields = json.loads(body or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"the request body is not valid JSON: {e}") from None
            if not isinstance(fields, dict):
                raise RequestError(400, "the request body must be a JSON object of form fields")
        else:
            raise RequestError(415, f"send JSON or multipart/form-data, not {content_type}")

        server = self.server
        params = validate_sampling(fields, server.limits, server.count_tokens(), server.image_vocab(),
                                   server.guidable(), server.check_words())
        if path == "/api/generate":
            job = Job("generate", params)
        else:
            completion = validate_completion(fields, server.pipeline.grid)
            if "image" not in files and "image" in fields:
                raise RequestError(400, "the image must be sent as a file (multipart/form-data), not as text")
            image = decode_image(files.get("image", b""), server.limits)
            job = Job("complete", params, completion, image)
        server.worker.submit(job)
        self._json(202, server.worker.describe(job))


# --- entry points --------------------------------------------------------------------------


def make_server(pipeline_factory: Callable[[], Any], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                limits: Limits | None = None, quiet: bool = False) -> DalleServer:
    """Build the pipeline (``pipeline_factory()``) and a server bound to ``host:port`` (0 = any free port).

    The worker starts at once; call ``serve_forever()`` (in a thread, for tests) to answer
    requests, then ``shutdown()`` and ``server_close()``.
    """
    pipeline = pipeline_factory()
    return DalleServer((host, port), pipeline, limits or Limits(), quiet=quiet)


def _listen_advice(error: OSError, port: int) -> str:
    """What to change when binding fails: the port (in use, privileged) or the host (not an address here)."""
    import errno
    import socket

    if error.errno == errno.EADDRINUSE:
        return "choose another --port"
    if error.errno in (errno.EACCES, errno.EPERM) and port < 1024:
        return "ports below 1024 need administrator rights; choose a --port of 1024 or more"
    if error.errno == errno.EADDRNOTAVAIL or isinstance(error, socket.gaierror):
        return ("--host must be an address of this machine (127.0.0.1 for this machine only, 0.0.0.0 for all "
                "its networks)")
    return "check --host and --port"


def serve(model: Path | str | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          device: str | None = None) -> None:
    """``dalle serve``: load the model (default: the bundled one) and serve the page until Ctrl-C."""
    from dalle.pipeline import DallePipeline

    print(f"loading the model from {model or 'the package (bundled model)'} ...", flush=True)
    try:
        server = make_server(lambda: DallePipeline.from_pretrained(model, device=device), host, port)
    except OSError as e:  # address in use, permission denied, not this machine's: a user error, not a crash
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}); {_listen_advice(e, port)}") from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this machine can use the page", flush=True)
    print(f"serving on {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        server.server_close()
