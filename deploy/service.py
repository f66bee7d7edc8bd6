"""The recommendation service: an ASGI app (FastAPI) around ``mmrec.serving``.

``create_app(Settings)`` builds the app; ``python -m deploy.serve`` starts it under uvicorn (one or
several worker processes). Each worker loads the model folder in a background thread at start-up
(``/health`` answers at once, ``/ready`` turns 200 when the model is loaded) and serves the live
catalog kept in ``state_dir`` (see ``mmrec.serving.LiveCatalog``: every worker checks the catalog
file's stamp before each request and reloads it when another worker changed it).

A new champion without downtime: with ``Settings.watch`` (``deploy.serve`` sets it when serving
from the registry), each worker asks the registry every ``interval_s`` seconds which version the
alias points at; when it changed (a promotion, ``python -m deploy.rollback``), the worker downloads
that version once (shared by the workers, under a file lock), loads it and its live catalog in a
background thread while the old model keeps answering, then swaps the two in one assignment:
a request already running finishes on the model it started with, the next one gets the new one,
and ``/version`` reports it. A version that fails to load is logged and skipped; the old model
stays.

Endpoints (``/docs`` and ``/openapi.json`` describe them):

``GET /health``            the process is up
``GET /ready``             the model is loaded (503 with the reason until then)
``GET /version``           model name, registry version, run, data version, catalog version
``POST /recommend``        top-k for one or many users
``PUT /items``             add or update items given by raw content (JSON, images as base64)
``POST /items/upload``     add or update one item (multipart form: item_id, text, image file)
``DELETE /items/{id}``     stop recommending an item
``GET /items/{id}``        whether an item is in the catalog (exported, added, updated, removed)

Every error is JSON ``{"code": ..., "message": ...}``: 413 for a body, image or image size over
its limit, 422 for a malformed or out-of-range request (``k``, history length, unknown item ids,
undecodable images), 404 for an unknown item, 503 while loading or when a request exceeds its
deadline, 500 with a request id (the stack trace goes to the server log only).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmrec.serving import ContentError, LimitError, Limits, NewItem, check_k

log = logging.getLogger("mmrec.service")

SETTINGS_ENV = "MMREC_SERVE_SETTINGS"


@dataclass
class Settings:
    """What a worker needs; ``deploy.serve`` passes it to uvicorn's workers as JSON in
    ``$MMREC_SERVE_SETTINGS``."""

    model_dir: str
    """An exported model folder (``mmrec.export``)."""
    state_dir: str
    """Where the live catalog's changes are kept (shared by all workers)."""
    limits: dict[str, int] = field(default_factory=dict)
    """Overrides of ``mmrec.serving.Limits`` fields."""
    faiss_min_items: int = 200_000
    """Catalogs with at least this many exported items are searched with faiss (IVF), smaller ones exactly."""
    nprobe: int = 64
    """faiss lists visited per query."""
    timeout_s: float = 10.0
    """Deadline of one request's work; past it the answer is 503 (the computation is bounded by the limits)."""
    threads: int = 1
    """Torch threads per worker (several workers on a few cores: 1)."""
    max_inflight: int = 4
    """Requests computed at once per worker; more wait (within their deadline)."""
    version: dict[str, Any] = field(default_factory=dict)
    """What ``/version`` reports about the model (registry name, version, run, data version)."""
    watch: dict[str, Any] | None = None
    """Reload on alias change: ``{"tracking_uri", "name", "alias", "interval_s", "models_dir"}`` (None: never)."""

    @classmethod
    def from_env(cls) -> Settings:
        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            raise RuntimeError(f"${SETTINGS_ENV} is not set: start the service with `python -m deploy.serve`")
        return cls(**json.loads(raw))


class Problem(Exception):
    """An error answered as ``{"code", "message"}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# ------------------------------------------------------------------------------------------------
# Request and response bodies

class ContentItem(BaseModel):
    """An item given by raw content: text and/or an image (base64 of the file's bytes)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: str | None = Field(None, description="the item's text (title, description)")
    image_base64: str | None = Field(None, description="the image file's bytes, base64 (PNG, JPEG, WEBP, GIF, BMP)")


class CatalogItem(ContentItem):
    item_id: str = Field(..., description="the id the item is recommended under")


class UserQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    history: list[str | ContentItem] = Field(
        default_factory=list,
        description="oldest first: catalog item ids and/or items given by content; empty = a new user "
                    "(answered with the most popular training items, source 'popularity')")
    exclude_seen: bool = Field(True, description="leave the history's catalog items out of the answer")
    restrict_to: list[str] | None = Field(None, description="answer only with these catalog item ids")


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    users: list[UserQuery] = Field(..., description="one entry per user")
    k: int = Field(10, description="recommendations per user (1..max_k)")


class Scored(BaseModel):
    item_id: str
    score: float


class UserAnswer(BaseModel):
    items: list[Scored]
    source: str = Field(..., description="'model': user . item scores; 'popularity': training interaction counts "
                                         "(empty history)")


class RecommendResponse(BaseModel):
    results: list[UserAnswer]
    catalog_version: int


class UpsertRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    items: list[CatalogItem]


class CatalogChange(BaseModel):
    catalog_version: int
    created: list[str] = Field(default_factory=list, description="ids that were not in the catalog before")


class ErrorBody(BaseModel):
    code: str
    message: str


ERRORS = {s: {"model": ErrorBody} for s in (404, 413, 422, 500, 503)}


# ------------------------------------------------------------------------------------------------
# Middleware: body size

class BodyLimit:
    """Refuses a request body over ``max_bytes`` with 413: by its Content-Length when given, else
    by counting the chunks as they stream in (the body is read here, at most ``max_bytes`` of it,
    and handed to the app whole)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _problem(413, "body_too_large", f"request body exceeds the limit of {self.max_bytes} bytes (max_body_bytes)")
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and int(length) > self.max_bytes:
                return await too_large(scope, receive, send)
        except ValueError:
            return await _problem(400, "bad_request", "invalid Content-Length")(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _problem(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


# ------------------------------------------------------------------------------------------------
# The app

@dataclass(frozen=True)
class Served:
    """What one worker serves: swapped as a whole when a new version is loaded."""

    catalog: Any
    """The ``mmrec.serving.LiveCatalog`` of the model."""
    model_dir: str
    version: dict[str, Any]
    loaded_at: float


class Service:
    """The loaded model and catalog of one worker."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.limits = Limits(**settings.limits)
        self.served: Served | None = None
        self.error: str | None = None
        self.reload_error: str | None = None
        self.limiter = anyio.CapacityLimiter(settings.max_inflight)
        self.stopped = threading.Event()

    @property
    def catalog(self):
        served = self.served
        return None if served is None else served.catalog

    def _open(self, model_dir: str, version: dict[str, Any]) -> Served:
        import torch

        from mmrec.export import load_model
        from mmrec.serving import CatalogStore, LiveCatalog

        torch.set_num_threads(max(1, self.settings.threads))
        t0 = time.perf_counter()
        exported = load_model(model_dir)
        catalog = LiveCatalog(exported, CatalogStore(self.settings.state_dir), self.limits,
                              faiss_min_items=self.settings.faiss_min_items, nprobe=self.settings.nprobe)
        log.info("model %s (version %s) loaded in %.1f s (%d items, catalog version %d)", model_dir,
                 version.get("version"), time.perf_counter() - t0, exported.n_items, catalog.version)
        return Served(catalog, model_dir, dict(version), time.time())

    def load(self) -> None:
        try:
            self.served = self._open(self.settings.model_dir, self.settings.version)
        except Exception as exc:  # reported by /ready; the trace stays in the log
            log.exception("loading the model failed")
            self.error = f"loading the model failed: {type(exc).__name__}"
            return
        if self.settings.watch:
            threading.Thread(target=self.watch, name="watch-registry", daemon=True).start()

    def watch(self) -> None:
        """Every ``interval_s``: where does the alias point? A new version is loaded here, in
        the background, and swapped in (see the module docstring)."""
        from deploy.registry import MlflowRegistry, fetch_model

        w = self.settings.watch
        registry, failed = None, None
        while not self.stopped.wait(float(w["interval_s"])):
            version = None
            try:
                registry = registry or MlflowRegistry(w["tracking_uri"])
                info = registry.describe(w["name"], w["alias"])
                version = info["version"]
                if version == self.served.version.get("version") or version == failed:
                    continue
                log.info("models:/%s@%s moved to version %s: loading it", w["name"], w["alias"], version)
                model_dir = fetch_model(w["tracking_uri"], info, Path(w["models_dir"]) / f"v{version}")
                keep = ("name", "alias", "version", "run_id", "data_version", "git_commit")
                self.served = self._open(str(model_dir), {k: info.get(k) for k in keep})  # the swap
                self.reload_error = None
            except Exception as exc:  # the old model keeps serving
                failed = version
                self.reload_error = f"version {version}: {type(exc).__name__}" if version else type(exc).__name__
                log.exception("reloading models:/%s@%s failed; still serving version %s", w["name"], w["alias"],
                              self.served.version.get("version"))

    def need(self):
        if self.catalog is None:
            raise Problem(503, "not_ready", self.error or "the model is still loading")
        return self.catalog

    async def wait(self):
        """The catalog; a request that arrives while this worker is still loading waits for it
        (within the request deadline) instead of failing."""
        if self.catalog is None and self.error is None:
            with anyio.move_on_after(self.settings.timeout_s):
                while self.catalog is None and self.error is None:
                    await anyio.sleep(0.05)
        return self.need()

    async def run(self, fn, *args):
        """``fn(*args)`` in a worker thread, within the request deadline. A request past it gets
        503; its thread finishes the (limit-bounded) computation and the result is dropped."""
        timeout = self.settings.timeout_s
        try:
            with anyio.fail_after(timeout):
                return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter, abandon_on_cancel=True)
        except TimeoutError:
            raise Problem(503, "timeout", f"the request did not finish within {timeout:g} s") from None


def _decode_b64(data: str, where: str, limits: Limits) -> bytes:
    # base64 is 4/3 of the bytes: refuse by length before decoding
    limits.check(f"{where} has about {len(data) * 3 // 4} bytes", len(data) * 3 // 4, "max_image_bytes", too_large=True)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ContentError(f"{where}: image_base64 is not valid base64") from None


def _new_item(item: ContentItem, where: str, limits: Limits, item_id: str | None = None) -> NewItem:
    image = _decode_b64(item.image_base64, f"image of {where}", limits) if item.image_base64 else None
    return NewItem(item_id, item.text, image)


def create_app(settings: Settings) -> FastAPI:
    service = Service(settings)

    async def lifespan(app):
        threading.Thread(target=service.load, name="load-model", daemon=True).start()
        yield
        service.stopped.set()

    app = FastAPI(title="mmrec recommendation service", version="1",
                  description=__doc__.split("\n\n")[0], lifespan=lifespan, responses=ERRORS)
    app.state.service = service
    limits = service.limits

    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem):
        return _problem(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return _problem(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _problem(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        rid = uuid.uuid4().hex[:12]
        log.error("request %s %s failed (id %s)", request.method, request.url.path, rid, exc_info=exc)
        return _problem(500, "internal_error", f"internal error (request id {rid}; details are in the server log)")

    def translate(fn):
        """Library errors -> problems (their messages name the request's item, field and limit)."""
        def wrapped(*args):
            try:
                return fn(*args)
            except LimitError as exc:
                raise Problem(413 if exc.too_large else 422, "limit_exceeded", str(exc)) from None
            except ContentError as exc:
                raise Problem(422, "bad_content", str(exc)) from None
            except KeyError as exc:
                raise Problem(422, "unknown_item", exc.args[0] if exc.args else str(exc)) from None
            except ValueError as exc:
                raise Problem(422, "invalid_request", str(exc)) from None
        return wrapped

    @app.get("/health", summary="the process is up")
    async def health():
        return {"status": "ok", "pid": os.getpid()}

    @app.get("/ready", summary="the model is loaded and the catalog readable", responses={503: {"model": ErrorBody}})
    async def ready():
        catalog = service.need()  # no waiting: a probe wants to know now
        return {"status": "ready", "items": catalog.current().n_items, "catalog_version": catalog.version}

    @app.get("/version", summary="the served model: registry version, run, data version; catalog version")
    async def version():
        await service.wait()
        served = service.served
        catalog, meta = served.catalog, served.catalog.base.meta
        return {**served.version, "model_dir": served.model_dir, "domain": meta.get("domain"),
                "loaded_at": served.loaded_at, "reload_error": service.reload_error,
                "item_tower": meta.get("model", {}).get("item_tower", {}).get("name"),
                "exported_items": catalog.base.n_items, "catalog_version": catalog.version,
                "retrieval": "faiss-ivf" if catalog.index is not None else "exact"}

    @app.post("/recommend", response_model=RecommendResponse, summary="top-k for one or many users")
    async def recommend(req: RecommendRequest):
        k = translate(check_k)(req.k, limits)
        translate(limits.check)(f"{len(req.users)} users", len(req.users), "max_users")
        n_content = 0
        for u, q in enumerate(req.users):
            translate(limits.check)(f"history of user {u} has {len(q.history)} items", len(q.history), "max_history")
            if q.restrict_to is not None:
                translate(limits.check)(f"restrict_to of user {u} has {len(q.restrict_to)} ids", len(q.restrict_to), "max_allowed")
                if not q.restrict_to:
                    raise Problem(422, "invalid_request", f"restrict_to of user {u} is empty (leave it out to allow every item)")
            n_content += sum(not isinstance(h, str) for h in q.history)
        translate(limits.check)(f"{n_content} history items given by content", n_content, "max_items")
        catalog = await service.wait()

        def work():
            view = catalog.current()
            raw = [(u, c, h) for u, q in enumerate(req.users) for c, h in enumerate(q.history) if not isinstance(h, str)]
            histories = [list(q.history) for q in req.users]
            if raw:
                from mmrec.serving import encode_items

                items = [_new_item(h, f"history item {c} of user {u}", limits) for u, c, h in raw]
                vecs = encode_items(view.model, items, limits)
                for (u, c, _), v in zip(raw, vecs):
                    histories[u][c] = v
            # exclude_seen differs per user: rank the two groups separately
            out = [None] * len(histories)
            for flag in (True, False):
                who = [u for u, q in enumerate(req.users) if q.exclude_seen is flag]
                if who:
                    ranked = view.rank([histories[u] for u in who], k, exclude_history=flag,
                                       allowed=[req.users[u].restrict_to for u in who])
                    for u, r in zip(who, ranked):
                        out[u] = r
            return out, catalog.version

        results, cv = await service.run(translate(work))
        return {"results": [{"items": [{"item_id": i, "score": s} for i, s in r.pairs()], "source": r.source}
                            for r in results], "catalog_version": cv}

    @app.put("/items", response_model=CatalogChange, summary="add or update items given by raw content")
    async def upsert(req: UpsertRequest):
        translate(limits.check)(f"{len(req.items)} items", len(req.items), "max_items")
        catalog = await service.wait()

        def work():
            items = [_new_item(it, f"item {it.item_id!r}", limits, it.item_id) for it in req.items]
            return catalog.upsert(items)

        version, created = await service.run(translate(work))
        return {"catalog_version": version, "created": created}

    @app.post("/items/upload", response_model=CatalogChange, summary="add or update one item (multipart form)")
    async def upload(item_id: str = Form(...), text: str | None = Form(None), image: UploadFile | None = File(None)):
        catalog = await service.wait()
        data = None
        if image is not None:
            data = await image.read(limits.max_image_bytes + 1)
            if len(data) > limits.max_image_bytes:
                raise Problem(413, "limit_exceeded", f"image of item {item_id!r} exceeds the limit of "
                                                     f"{limits.max_image_bytes} bytes (max_image_bytes)")
        version, created = await service.run(translate(catalog.upsert), [NewItem(item_id, text, data or None)])
        return {"catalog_version": version, "created": created}

    @app.delete("/items/{item_id:path}", response_model=CatalogChange, summary="stop recommending an item")
    async def remove(item_id: str):
        catalog = await service.wait()

        def work():
            try:
                return catalog.remove([item_id])
            except KeyError as exc:
                raise Problem(404, "unknown_item", exc.args[0]) from None

        return {"catalog_version": await service.run(work)}

    @app.get("/items/{item_id:path}", summary="whether an item is in the catalog")
    async def item(item_id: str):
        catalog = await service.wait()
        catalog.refresh()
        state = catalog.state(item_id)
        if state is None:
            raise Problem(404, "unknown_item", f"unknown item id {item_id!r}")
        return {"item_id": item_id, "state": state, "catalog_version": catalog.version}

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app


def app_from_env() -> FastAPI:
    """uvicorn's factory in each worker process (``deploy.serve`` sets the environment)."""
    level = os.environ.get("MMREC_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    return create_app(Settings.from_env())

