"""The HTTP app: OpenAI's `POST /v1/chat/completions` (plain and streamed), `GET /v1/models`,
`GET /health` and `GET /metrics`, over one `ModelWorker`.

    settings = ServeSettings(model=Path("runs/tiny-pkg"))
    app = create_app(settings, load_worker(settings))       # or create_app(settings, loader) to load
    uvicorn.run(app, host="127.0.0.1", port=8000)           # in the background (/health says 503 until then)

The same app runs under Ray Serve, one per replica (sleigh/serve/ray_app.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from sleigh.errors import SleighError, first_line
from sleigh.runtime import DEFAULT_MAX_NEW_TOKENS
from sleigh.runtime.pipeline import ContextExceeded, ModelFault
from sleigh.serve import MAX_BODY_MB, MAX_IMAGE_PIXELS, MAX_QUEUE, protocol
from sleigh.serve.metrics import CONTENT_TYPE, Metrics
from sleigh.serve.protocol import APIError
from sleigh.serve.worker import GenerationRequest, Job, ModelWorker, QueueFull

log = logging.getLogger("sleigh.serve")

MiB = 1 << 20
MAX_BODY_BYTES = 1024 * MiB  # --max-body-mb 1024 at most


@dataclass(frozen=True)
class ServeSettings:
    """What `sleigh serve` is started with (and what each Ray replica loads)."""

    model: Path
    backend: str = "auto"
    engine: str | None = None
    threads: int | None = None
    model_name: str | None = None  # the id clients send as `model` (default: the package folder's name)
    max_queue: int = MAX_QUEUE
    max_body_bytes: int = MAX_BODY_MB * MiB
    max_image_pixels: int = MAX_IMAGE_PIXELS
    allow_local_files: Path | None = None
    default_max_tokens: int = DEFAULT_MAX_NEW_TOKENS
    retry_after_s: int = 1
    max_memory: int | None = None  # bytes: --max-memory (runtime/memory.py)

    def __post_init__(self):
        """Each field checked where it is set, by `sleigh serve` or Ray's `serve run ...:app_builder`:
        one SleighError naming it (the CLI names its flag instead: launch.FLAGS)."""
        from sleigh.runtime.image import MAX_PIXELS

        def whole(value, least: int, most: float = float("inf")) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and least <= value <= most

        checks = [("max_queue", whole(self.max_queue, 0), ">= 0"),
                  ("default_max_tokens", whole(self.default_max_tokens, 1), ">= 1"),
                  ("max_body_bytes", whole(self.max_body_bytes, 1, MAX_BODY_BYTES), f"1 to {MAX_BODY_BYTES:,}"),
                  ("max_image_pixels", whole(self.max_image_pixels, 1, MAX_PIXELS), f"from 1 to {MAX_PIXELS:,} (Pillow's limit)"),
                  ("threads", self.threads is None or whole(self.threads, 1), ">= 1"),
                  ("retry_after_s", whole(self.retry_after_s, 0), ">= 0"),
                  ("max_memory", self.max_memory is None or whole(self.max_memory, 1), "a number of bytes >= 1")]
        for name, ok, expected in checks:
            if not ok:
                raise SleighError(name, f"got {getattr(self, name)}", expected)
        if self.allow_local_files is not None and not Path(self.allow_local_files).is_dir():
            raise SleighError("allow_local_files", f"{self.allow_local_files} is not a folder", "an existing folder")

    @property
    def name(self) -> str:
        return self.model_name or Path(self.model).resolve().name


def load_worker(settings: ServeSettings) -> ModelWorker:
    """The settings' model as a worker (a one-line SleighError if it does not load)."""
    from sleigh.runtime.pipeline import Pipeline

    pipe = Pipeline.load(settings.model, backend=settings.backend, threads=settings.threads, engine=settings.engine,
                         max_memory=settings.max_memory)
    return ModelWorker(pipe, max_queue=settings.max_queue, owns_pipeline=True)


class _State:
    def __init__(self, worker: ModelWorker | None):
        self.worker = worker
        self.load_error: str | None = None
        # A shutdown under Ray Serve (ray_app.watch_drain): `draining` refuses new requests (503) while
        # those under way finish; `cut` then stops them, each answered as uvicorn's shutdown answers it.
        self.draining = False
        self.cut = False
        self.handling = 0  # requests in chat_completions until their response is made (a stream's at its first event)
        self.metrics = Metrics(lambda: self.worker.waiting if self.worker else 0,
                               lambda: self.worker.running if self.worker else 0)

    def busy(self) -> int:
        """Requests this replica is still working on: being read or waiting for their first event, queued,
        or generating (a stream's later events come from its running job). 0 does not mean every answer
        has gone out: the last events of one just finished may still be on their way (Ray's own grace,
        ray_app.DRAINED_GRACE_S, carries them)."""
        worker = self.worker
        return self.handling + (worker.waiting + worker.running if worker is not None else 0)


def create_app(settings: ServeSettings, worker: ModelWorker | Callable[[], ModelWorker]) -> FastAPI:
    """`worker` loaded, or a loader run in a background thread at startup."""
    state = _State(worker if isinstance(worker, ModelWorker) else None)

    def load() -> None:
        try:
            state.worker = worker()
        except Exception as e:  # noqa: BLE001 - reported by /health, and logged
            state.load_error = str(e) if isinstance(e, SleighError) else f"{type(e).__name__}: {e}"
            log.exception("model failed to load")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.worker is None:
            threading.Thread(target=load, name="sleigh-load", daemon=True).start()
        yield
        if state.worker is not None:
            state.worker.close()

    app = _App(title="sleigh serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.sleigh = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return _error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {message}"),
                               exc.headers)  # a 405's Allow

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return _internal_error(exc)

    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers probe with HEAD too
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if state.worker is not None:
            return {"status": "ok", "model": settings.name}
        status = "failed: " + state.load_error if state.load_error else "loading"
        return JSONResponse({"status": status}, status_code=503)

    model_object = {"id": settings.name, "object": "model", "created": 0, "owned_by": "sleigh"}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models():
        return {"object": "list", "data": [model_object]}

    @app.api_route("/v1/models/{model:path}", methods=["GET", "HEAD"])  # the openai client's models.retrieve
    async def one_model(model: str):
        if not model:  # /v1/models/: the list, as the path without its slash
            return {"object": "list", "data": [model_object]}
        if model != settings.name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{settings.name}`",
                           param="model", code="model_not_found")
        return model_object

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post(CHAT_PATH)
    async def chat_completions(request: Request):
        arrived = time.perf_counter()
        state.handling += 1
        try:
            response = await _chat(request, settings, state, arrived)
        except APIError as e:
            response = _error_response(e)
        except asyncio.CancelledError as e:  # anywhere in the request: reading it, its image, its answer
            if not _shutdown_cut(e):  # a client gone under Ray Serve, a caller's deadline: theirs to handle
                raise
            response = _error_response(_cut_off())
        finally:
            state.handling -= 1
        state.metrics.request(response.status_code)
        return response

    async def chat_asgi(scope, receive, send) -> None:
        request = Request(scope, receive)
        try:
            response = await chat_completions(request)
        except Exception as e:  # noqa: BLE001 - as the app's handler above
            response = _internal_error(e)
        await response(scope, receive, send)

    app.chat_asgi = chat_asgi
    return app


CHAT_PATH = "/v1/chat/completions"


class _App(FastAPI):
    """FastAPI, with `POST /v1/chat/completions` answered before FastAPI's middleware and routing:
    they cost about 0.3 ms a request on the dev CPU, all of it on the time to first token. Other
    requests, and that one under a root path (a prefix), take the ordinary route (same handler)."""

    chat_asgi = None

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] == "http" and scope["path"] == CHAT_PATH and scope["method"] == "POST"
                and not scope.get("root_path") and self.chat_asgi is not None):
            await self.chat_asgi(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


async def _chat(request: Request, settings: ServeSettings, state: _State, arrived: float):
    if state.draining:
        raise APIError(503, "the server is shutting down and takes no new requests; retry later",
                       retry_after=settings.retry_after_s)  # another replica or server may take it
    body = await _read_body(request, settings.max_body_bytes)
    req = protocol.parse_request(body)
    if req.model != settings.name:
        raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{settings.name}` "
                            "(GET /v1/models)", param="model", code="model_not_found")
    conv = protocol.to_conversation(req)
    sampling = protocol.sampling_options(req)
    worker = state.worker
    if worker is None:
        raise APIError(503, "the model is still loading", retry_after=settings.retry_after_s)
    if req.max_tiles is not None and req.max_tiles > worker.pipeline.max_tiles:  # the model's, or the engine's fewer
        raise APIError(400, f"max_tiles: {req.max_tiles} is above the {worker.pipeline.max_tiles} this model takes",
                       param="max_tiles")
    if worker.full:  # before decoding an image that would wait nowhere
        raise _busy(worker, settings)
    image = None
    if conv.image_url is not None:
        image = await run_in_threadpool(protocol.decode_image, conv.image_url, conv.image_param,
                                        max_pixels=settings.max_image_pixels, local_root=settings.allow_local_files)
    limit, asked = protocol.max_new_tokens(req, settings.default_max_tokens)
    gen_request = GenerationRequest(conv.turns, conv.system, image, limit, sampling, protocol.stop_strings(req),
                                    req.max_tiles, req.ignore_eos, fit_context=not asked)
    try:
        job = worker.submit(gen_request)
    except QueueFull:
        raise _busy(worker, settings) from None
    except SleighError as e:  # the worker has closed: the server is shutting down
        raise APIError(503, first_line(e)) from None
    watcher = _DisconnectWatch(request, job, state)
    try:
        first = await job.events.get()
    except BaseException:  # cancelled (the client went away under Ray Serve, or shutdown: chat_completions)
        _stop(job, watcher, state, finished=False)
        raise
    if first[0] in ("piece", "done"):
        state.metrics.first_token(time.perf_counter() - arrived)
    if first[0] in ("error", "cancelled"):
        _stop(job, watcher, state)
        return _error_response(_generation_error(first[1])) if first[0] == "error" else _cancelled(state)
    cid = protocol.completion_id()
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _EventStream(_sse(job, first, cid, settings.name, include_usage, watcher, state))
    event = first
    job.first_piece_sent.set()
    try:
        while event[0] == "piece":
            event = await job.events.get()
    finally:
        _stop(job, watcher, state, finished=event[0] != "piece")
    kind, value = event
    if kind == "error":
        return _error_response(_generation_error(value))
    if kind == "cancelled":
        return _cancelled(state)
    _record(state, value)
    return JSONResponse(protocol.completion(cid, settings.name, value))


class _EventStream(Response):
    """A `text/event-stream` response from an async iterator of events: Starlette's StreamingResponse
    without its task group listening for the disconnect (the request's `_DisconnectWatch` does that).
    The iterator is closed however the response ends, so its `finally` runs at once."""

    media_type = "text/event-stream"

    def __init__(self, events):
        self.events, self.status_code, self.background = events, 200, None
        self.init_headers({"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError as e:  # cut off by the shutdown: an error event ends the stream (no [DONE])
            if not _shutdown_cut(e):
                raise
            await send({"type": "http.response.body", "body": _event(_cut_off().body()).encode(), "more_body": False})
        finally:
            await self.events.aclose()


async def _sse(job: Job, first, cid: str, model: str, include_usage: bool, watcher: _DisconnectWatch, state: _State):
    """Server-sent events in OpenAI's chunk shape, `data: [DONE]` last. The role chunk goes out with
    the first piece of text, in one write."""
    kind, value = first
    try:
        opening = _event(protocol.chunk(cid, model, {"role": "assistant", "content": ""}))
        if kind == "piece":
            yield opening + _event(protocol.chunk(cid, model, {"content": value}))
            job.first_piece_sent.set()  # sent: the worker goes on to the next token
            kind, value = await job.events.get()
        else:
            yield opening
        while kind == "piece":
            yield _event(protocol.chunk(cid, model, {"content": value}))
            kind, value = await job.events.get()
        if kind == "done":
            _record(state, value)
            yield _event(protocol.chunk(cid, model, {}, value.stop_reason, sleigh=protocol.sleigh_fields(value)))
            if include_usage:
                yield _event({**protocol.chunk(cid, model, {}), "choices": [], "usage": protocol.usage(value)})
        elif kind == "error":
            yield _event(_generation_error(value).body())
        elif kind == "cancelled" and state.cut:  # as uvicorn's cut: an error event ends the stream, no [DONE]
            yield _event(_cut_off().body())
        if kind != "cancelled":
            yield "data: [DONE]\n\n"
    finally:  # the stream ended, or the client went away (this generator was closed or cancelled)
        _stop(job, watcher, state, finished=kind != "piece")


# What uvicorn cancels the requests under way with once --shutdown-timeout has passed (its server.py)
SHUTDOWN_CANCEL = "timeout graceful shutdown exceeded"


def _shutdown_cut(e: asyncio.CancelledError) -> bool:
    """Whether this cancellation is uvicorn's at the shutdown (then the request is answered, and the
    cancellation ends there); any other (Ray Serve's for a client gone, a caller's deadline) goes on."""
    if not any(SHUTDOWN_CANCEL in str(a) for a in e.args):
        return False
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):  # Python 3.11+: the task no longer counts as cancelling
        task.uncancel()
    return True


def _cut_off() -> APIError:
    """An answer cut off by a shutdown (`sleigh serve --shutdown-timeout`): not a bug, no traceback."""
    log.info("an answer under way was cut off by the shutdown")
    return APIError(503, "the server is shutting down and cut this answer off (sleigh serve --shutdown-timeout)")


def _cancelled(state: _State) -> Response:
    """A job cancelled: its client went away (499, read by nobody), or the shutdown cut it off."""
    return _error_response(_cut_off()) if state.cut else Response(status_code=499)


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stop(job: Job, watcher: _DisconnectWatch, state: _State, *, finished: bool = True) -> None:
    """The request is over for the server: stop watching, and stop its generation if it still runs
    (`finished=False`: the client went away)."""
    watcher.cancel()
    if not finished and not job.cancelled.is_set():
        state.metrics.cancel()
    job.cancel()


class _DisconnectWatch:
    """Stops the job when its client goes away: checks every `every_s`, from `every_s` after the submit
    on, so a request answered sooner costs no task and no check (and the event loop stays idle while
    the worker thread computes the first token)."""

    def __init__(self, request: Request, job: Job, state: _State, every_s: float = 0.05):
        self._request, self._job, self._state, self._every_s = request, job, state, every_s
        self._task: asyncio.Task | None = None
        self._timer = asyncio.get_running_loop().call_later(every_s, self._start)

    def _start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while not self._job.cancelled.is_set():
            if await self._request.is_disconnected():
                self._state.metrics.cancel()
                self._job.cancel()
                return
            await asyncio.sleep(self._every_s)

    def cancel(self) -> None:
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()


def _record(state: _State, result) -> None:
    state.metrics.finished(result.prompt_tokens, len(result.token_ids), result.timings.decode_tokens_per_s)


def _busy(worker: ModelWorker, settings: ServeSettings) -> APIError:
    return APIError(503, f"the server is busy ({worker.max_queue} requests already wait); retry later",
                    code="server_is_overloaded", retry_after=settings.retry_after_s)  # OpenAI's type and code for it


def _generation_error(exc: BaseException) -> APIError:
    if isinstance(exc, ModelFault):  # the model's, not the request's
        return APIError(500, first_line(exc))
    if isinstance(exc, ContextExceeded):  # in the request's own terms, with the remedies that are the request's
        message = f"{exc.what} | {exc.problem}. Expected: {exc.request_expected}"
        return APIError(400, message.replace("max_new_tokens", "max_tokens"), param="messages",
                        code="context_length_exceeded")  # OpenAI's code for it
    if isinstance(exc, SleighError):
        return APIError(400, first_line(exc))
    return APIError(500, f"generation failed ({type(exc).__name__}); see the server log")


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(413, f"the request body is larger than {limit:,} bytes (--max-body-mb)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_large
            chunks.append(part)
    except ClientDisconnect:  # gone before its request arrived: nobody to answer, and no bug to log
        raise APIError(499, "the client disconnected while sending its request") from None
    return b"".join(chunks)


def _internal_error(exc: Exception) -> JSONResponse:
    """A bug: logged here (called in its `except`), one line to the client."""
    log.exception("unexpected error")
    return _error_response(APIError(500, f"internal error ({type(exc).__name__}); see the server log"))


def _error_response(e: APIError, headers: dict | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if e.retry_after is not None:
        headers["Retry-After"] = str(e.retry_after)
    return JSONResponse(e.body(), status_code=e.status, headers=headers or None)
