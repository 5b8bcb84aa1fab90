"""A REST service and a web page for a trained model: FastAPI on uvicorn.

Endpoints:

* ``POST /predict``: one or several images (multipart field ``files``) -> the top-k classes of each.
* ``POST /search``: images -> the most similar images of a retrieval index (``--index``), with scores.
* ``GET /thumb/{id}``: a JPEG thumbnail of an indexed image; only ids in the index are served, so no request can name
  a file on disk.
* ``GET /health``: model, classes, index size and the admission counters. ``GET /docs``: the OpenAPI documentation.
* ``GET /``: a web page (template ``service.html``, its script and styles under ``GET /static/``; no external
  assets): drop or choose an image, see the class probabilities as bars and, with an index, the most similar images
  as thumbnails.

Bad input is the client's error, never a crash: bodies over ``max_upload_bytes`` get 413 (FastAPI checks the
``Content-Length`` header and counts the bytes actually received), files that are not images, truncated images and
decompression bombs get 400 naming the file. The model loads once, when the app is created; decoding runs in
parallel in the server's worker threads and the forward pass under a lock, so concurrent requests are safe.

Access and load (:mod:`headstart.serving.guard`): with an API key, requests without it get 401 (the page asks for it
once); at most ``max_queue`` requests are in progress at a time, and one past that gets 503 with ``Retry-After`` at
once. :func:`run` refuses to bind a non-loopback address without a key unless told ``insecure``.
"""

from __future__ import annotations

import contextlib
import io
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from headstart import progress
from headstart.data.scan import thumbnail
from headstart.data.transforms import TTA_MODES, Preprocessing, View, base_tensor, eval_tensor, normalize, tta_views
from headstart.errors import ConfigError, DataError
from headstart.hardware import autocast
from headstart.insight.pages import render, stylesheet
from headstart.insight.predictor import Model, load, top_classes
from headstart.models.backbones import Backbone
from headstart.serving.guard import ApiKey, Guard, Queue, check_bind, key_file_warning, resolve_api_key

DEFAULT_MAX_UPLOAD = 16 * 2**20  # bytes per request: a few phone photos; larger bodies get 413
MAX_FILES = 32  # images per request; each is decoded and held as a tensor, so the count bounds memory
# Requests in progress at a time (reading, decoding, waiting for the model, running it); one more gets 503. Equal to
# MAX_FILES: a full queue of full requests then holds at most 32 x 32 decoded images (150 MB at 224 px), and it stays
# under the 40 worker threads of Starlette's pool, so an admitted request never waits in a second, hidden queue.
DEFAULT_MAX_QUEUE = MAX_FILES
MAX_K = 100  # most results per query for top_k and k
THUMB_SIDE = 160  # pixels, longer side of a thumbnail


class ServeError(ValueError):
    """The service cannot start as configured (the message says what to change)."""


class FairLock:
    """A lock granted in the order it was asked for. ``threading.Lock`` wakes an arbitrary waiter: under load one
    request could lose the race again and again, and the slowest answers would take several times the queue's length.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._turns: deque[threading.Event] = deque()  # one per waiting thread, oldest first
        self._held = False

    def __enter__(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            turn = threading.Event()
            self._turns.append(turn)
        turn.wait()  # the holder hands the lock over directly: it stays held, and no one else can take it

    def __exit__(self, *exc: object) -> None:
        with self._mutex:
            if self._turns:
                self._turns.popleft().set()
            else:
                self._held = False

    def waiting(self) -> int:
        """Threads waiting for their turn."""
        return len(self._turns)


@dataclass
class _Upload:
    name: str
    data: bytes


class _Index:
    """A ``headstart.features.retrieval`` index folder, with the network that embeds queries as the collection was.

    :func:`headstart.features.retrieval.query_backbone` rebuilds that network from the index's record and refuses one
    whose weights fingerprint differs, so a query vector is always comparable with the stored ones.
    """

    def __init__(self, index_dir: Path):
        try:
            from headstart.features.retrieval import ImageIndex, query_backbone
        except ModuleNotFoundError as error:
            raise ServeError(
                f"--index {index_dir} needs headstart.features.retrieval (faiss-cpu); install headstart[retrieval]"
            ) from error
        self.index = ImageIndex.load(index_dir)
        self.backbone: Backbone = query_backbone(self.index).eval()
        self.precision = str(self.index.meta.get("precision", "fp32"))
        # Only these files are ever read for thumbnails: the ids are the index's own, never a client's path.
        self.paths: dict[int, Path] = {i: Path(item.path) for i, item in self.index.items.items()}
        self.labels: dict[int, str] = {i: item.label for i, item in self.index.items.items()}

    def search(self, x: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids [B, k] of the nearest stored images to a normalised batch (id -1: no more items)."""
        device = next(self.backbone.parameters()).device
        with torch.inference_mode(), autocast(device, self.precision):
            queries = self.backbone(x.to(device)).float().cpu().numpy()
        scores, ids = self.index.search(queries, k)
        return np.asarray(scores), np.asarray(ids)


class Service:
    """The loaded model (and index) behind the app: decode, predict and search, safe to call from many threads."""

    def __init__(self, run_dir: str | Path, index_dir: str | Path | None = None):
        tic = time.perf_counter()
        self.model: Model = load(run_dir)
        self.model.network().eval()  # a run folder's classifier, or an ONNX export (fp32 or int8)
        self.index = _Index(Path(index_dir)) if index_dir else None
        # One forward pass at a time: PyTorch modules are not documented as thread-safe, and on CPU one pass
        # already uses every core, so serialising costs no throughput. In arrival order, so a request waits for
        # at most the requests admitted before it (the queue's bound), not for whoever wins each release.
        self.lock = FairLock()
        self.load_seconds = time.perf_counter() - tic

    def decode(self, uploads: list[_Upload], prep: Preprocessing) -> torch.Tensor:
        """uint8 batch [B, 3, S, S] of the uploads; a bad file is a 400 naming it."""
        return self.decode_views(uploads, prep, [("center", None)])[0]

    def decode_views(self, uploads: list[_Upload], prep: Preprocessing, views: list[View]) -> list[torch.Tensor]:
        """One uint8 batch [B, 3, S, S] per view of the uploads (the centre crop, or a TTA view's), each upload decoded
        at most twice; a bad file is a 400 naming it."""
        tensors: list[list[torch.Tensor]] = [[] for _ in views]
        for upload in uploads:
            if not upload.data:
                raise HTTPException(400, f"{upload.name}: empty file; upload a JPEG, PNG, WebP, BMP, GIF or TIFF image")
            try:
                base: torch.Tensor | None = None
                for batch, (_, augment) in zip(tensors, views, strict=True):
                    if augment is None:
                        batch.append(eval_tensor(upload.data, prep))
                        continue
                    base = base_tensor(upload.data, prep) if base is None else base
                    batch.append(augment(base))
            except DataError as error:
                raise HTTPException(400, str(error).replace("<bytes>", upload.name, 1)) from error
        return [torch.stack(batch) for batch in tensors]

    def predict(self, uploads: list[_Upload], top_k: int, tta: str | None = None) -> list[dict[str, Any]]:
        """Top-k classes of each upload; with ``tta`` the logits of its views averaged (as ``Model.predict``; None:
        the model's own views)."""
        prep, views = tta_views(tta, self.model.preprocessing)
        try:
            network = self.model.network(prep)
        except ValueError as error:  # an export runs only its own preprocessing: no mirrored view (flip)
            raise HTTPException(400, str(error)) from error
        batches = [normalize(b, prep).to(self.model.device) for b in self.decode_views(uploads, prep, views)]
        with self.lock, torch.inference_mode(), autocast(self.model.device, self.model.precision):
            logits = torch.stack([network(x).float() for x in batches]).mean(0)
            probs = self.model.probabilities(logits).cpu().numpy()
        if self.model.multi_label:  # the labels at or above their thresholds, and every label's probability
            return [
                {"filename": upload.name, "labels": names, "label": "|".join(names),
                 "probability": top[0][1], "top": [{"label": label, "probability": p} for label, p in top],
                 "probabilities": dict(zip(self.model.classes, map(float, row), strict=True))}
                for upload, top, names, row in zip(
                    uploads, top_classes(probs, self.model.classes, top_k), self.model.decide(probs), probs, strict=True
                )
            ]  # fmt: skip
        return [
            {"filename": upload.name, "label": top[0][0], "probability": top[0][1],
             "top": [{"label": label, "probability": p} for label, p in top]}
            for upload, top in zip(uploads, top_classes(probs, self.model.classes, top_k), strict=True)
        ]  # fmt: skip

    def search(self, uploads: list[_Upload], k: int) -> list[dict[str, Any]]:
        """Nearest indexed images of each upload, best first."""
        if self.index is None:
            raise HTTPException(404, "no index loaded; start the server with --index INDEX_FOLDER to enable /search")
        index = self.index
        batch = self.decode(uploads, index.backbone.preprocessing)
        with self.lock:
            scores, ids = index.search(normalize(batch, index.backbone.preprocessing), min(k, len(index.paths)))
        results = []
        for upload, row_scores, row_ids in zip(uploads, scores, ids, strict=True):
            neighbours = [
                {"id": int(i), "name": index.paths[int(i)].name, "label": index.labels[int(i)],
                 "score": float(s), "thumb": f"/thumb/{int(i)}"}
                for s, i in zip(row_scores, row_ids, strict=True) if int(i) in index.paths
            ]  # fmt: skip
            results.append({"filename": upload.name, "neighbours": neighbours})
        return results

    @lru_cache(maxsize=1024)  # noqa: B019 - the Service lives as long as the app, so caching on it leaks nothing
    def thumbnail(self, item: int) -> bytes:
        """JPEG thumbnail of an indexed image (decoded with the same safety checks as uploads)."""
        if self.index is None or item not in self.index.paths:
            raise HTTPException(404, f"no indexed image with id {item}")
        path = self.index.paths[item]
        try:
            image = thumbnail(path, THUMB_SIDE)
        except (DataError, OSError) as error:
            raise HTTPException(404, f"indexed image {item} is no longer readable") from error
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        return buffer.getvalue()


def _check_max_queue(max_queue: int) -> None:
    if max_queue < 1:
        raise ConfigError(f"--max-queue {max_queue}: the service must admit at least 1 request at a time")


async def _read(files: list[UploadFile]) -> list[_Upload]:
    if len(files) > MAX_FILES:
        raise HTTPException(400, f"{len(files)} files in one request; send at most {MAX_FILES}")
    return [_Upload(f.filename or f"file{i}", await f.read()) for i, f in enumerate(files)]


def create_app(
    run_dir: str | Path,
    index_dir: str | Path | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    any_host: bool = False,
) -> FastAPI:
    """The web app for a trained model; loads the model (and index) now, once.

    Args:
        run_dir: run folder of a trained classifier.
        index_dir: optional retrieval index folder (``headstart index build``) for ``/search`` and thumbnails.
        max_upload_bytes: largest request body accepted; larger ones get 413.
        api_key: if given, every request but the page, its static files and a bare ``/health`` must carry it
            (:mod:`headstart.serving.guard`); see :func:`headstart.serving.guard.resolve_api_key` for its sources.
        max_queue: requests in progress at a time; one more gets 503 with ``Retry-After``.
        any_host: without a key, answer requests addressed to any host name (``--insecure``); else only to loopback
            names, which closes the service to web pages that reach it through DNS rebinding.

    Raises:
        ConfigError: ``max_queue`` below 1.
    """
    _check_max_queue(max_queue)
    service = Service(run_dir, index_dir)
    app = FastAPI(
        title="headstart",
        summary=f"{service.model.info.get('backbone')} classifier: {', '.join(service.model.classes)}",
        max_body_size=max_upload_bytes,
        form_limits={"max_files": MAX_FILES + 1},  # one more, so _read answers with the clearer message
    )
    app.state.service = service
    app.state.queue = queue = Queue(max_queue)
    app.add_middleware(Guard, key=ApiKey(api_key) if api_key else None, queue=queue, any_host=any_host)
    progress.log(f"model loaded from {run_dir} in {service.load_seconds:.1f} s")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = error.detail
        if error.status_code == 413 and detail == "Content Too Large":  # Starlette's body limit: say what it is
            detail = f"request body larger than the {max_upload_bytes:,}-byte limit; send smaller or fewer images"
        return JSONResponse({"detail": detail}, status_code=error.status_code, headers=error.headers)

    _add_health(app, service, queue, api_key is not None, max_upload_bytes)

    @app.post("/predict")
    async def predict(
        files: list[UploadFile] = File(..., description="one or several images"),  # noqa: B008 - FastAPI's idiom
        top_k: int = Query(5, ge=1, le=MAX_K, description="classes to return per image"),
        tta: str | None = Query(
            None, pattern="^(" + "|".join(TTA_MODES) + ")$", description="test-time augmentation (default: the model's)"
        ),
    ) -> dict[str, Any]:
        """Top-k classes with probabilities for each uploaded image (``tta``: none, flip or crops; default the
        model's own)."""
        uploads = await _read(files)
        return {"results": await _in_thread(service.predict, uploads, top_k, tta)}

    @app.post("/search")
    async def search(
        files: list[UploadFile] = File(..., description="one or several query images"),  # noqa: B008
        k: int = Query(8, ge=1, le=MAX_K, description="results per query"),
    ) -> dict[str, Any]:
        """The most similar indexed images for each uploaded image, with cosine-similarity scores."""
        if service.index is None:
            raise HTTPException(404, "no index loaded; start the server with --index INDEX_FOLDER to enable /search")
        uploads = await _read(files)
        return {"results": await _in_thread(service.search, uploads, k)}

    @app.get("/thumb/{item}", response_class=Response)
    def thumb(item: int) -> Response:
        """Thumbnail of an indexed image, by its id in the index."""
        # Behind a key, a shared cache must not hand the thumbnail to someone without it.
        cache = f"{'private' if api_key else 'public'}, max-age=3600"
        return Response(service.thumbnail(item), media_type="image/jpeg", headers={"Cache-Control": cache})

    _add_page(app)
    return app


def _add_health(app: FastAPI, service: Service, queue: Queue, keyed: bool, max_upload_bytes: int) -> None:
    """``GET /health``: liveness for anyone, and for callers with the key (or without one configured) what this server
    answers with and how full its queue is."""

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        """Liveness, and what this server answers with (without the service's key: liveness only)."""
        # async: answered on the event loop, so it never waits for a worker thread while the service is loaded.
        if not request.state.authorised:
            return {"status": "ok", "auth": "required"}
        return {
            "status": "ok",
            "auth": "key" if keyed else "none",
            "backbone": service.model.info.get("backbone"),
            "classes": service.model.classes,
            "multi_label": service.model.multi_label,
            "input_size": service.model.preprocessing.input_size,
            "index": service.index is not None,
            "index_size": len(service.index.paths) if service.index else 0,
            "max_upload_bytes": max_upload_bytes,
            "queue": queue.snapshot(),
        }


def _add_page(app: FastAPI) -> None:
    """``GET /``, the web page, and ``GET /static/...``, its stylesheets and script."""
    page_html = render("service.html", title="headstart")  # the page has no server-side values: render it once
    style = stylesheet()

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        """The web page."""
        return HTMLResponse(page_html)

    # The shared stylesheet is headstart.insight's (the offline pages inline it); this route comes before the mount
    # below, so it answers for static/style.css and the mount serves the page's own files.
    @app.get("/static/style.css", response_class=Response, include_in_schema=False)
    def style_css() -> Response:
        return Response(style, media_type="text/css")

    app.mount("/static", StaticFiles(packages=[("headstart.serving", "static")]), name="static")


async def _in_thread(fn: Any, *args: Any) -> Any:
    """Run blocking decode + inference in the worker pool, so the event loop keeps accepting requests."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def run(
    run_dir: str | Path,
    index: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    api_key: str | None = None,
    api_key_file: str | Path | None = None,
    insecure: bool = False,
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> None:
    """Serve a trained model over HTTP until interrupted.

    Args:
        run_dir: run folder of a trained classifier.
        index: optional retrieval index folder for ``/search``.
        host: address to bind; one other than loopback needs an API key, or ``insecure``.
        port: TCP port.
        max_upload_bytes: largest request body accepted; larger ones get 413.
        api_key: the key itself; else ``api_key_file``, else ``$HEADSTART_API_KEY`` (:func:`.guard.resolve_api_key`).
        api_key_file: a file holding the key.
        insecure: allow a non-loopback ``host`` without a key.
        max_queue: requests in progress at a time; one more gets 503 with ``Retry-After``.

    Raises:
        ConfigError: a non-loopback ``host`` without a key or ``insecure``; an unusable key or ``max_queue``. All
            three are checked before the model loads.
    """
    import uvicorn

    key = resolve_api_key(api_key, api_key_file)
    warnings = [check_bind(host, key, insecure), key_file_warning(api_key_file) if api_key_file else None]
    _check_max_queue(max_queue)
    for warning in filter(None, warnings):
        print(warning, file=sys.stderr, flush=True)  # not progress.log: HEADSTART_QUIET must not hide these
    app = create_app(run_dir, index, max_upload_bytes, api_key=key, max_queue=max_queue, any_host=insecure)
    access = "API key required" if key else "no API key"
    print(f"headstart serving {run_dir} on http://{host}:{port}/ ({access}; at most {max_queue} requests at a "
          "time; API docs at /docs)", flush=True)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="warning")


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` on uvicorn in a background thread; yields its base URL and stops it on exit (tests, benchmarks).

    ``port=0`` binds a free port chosen by the operating system.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise ServeError(f"uvicorn did not start on {host}:{sock.getsockname()[1]}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
