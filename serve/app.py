"""The codec as an HTTP service: one SdcCodec per process, neural work in a bounded pool.

    POST /v1/encode   image bytes -> .sdc (query: the encoder options, e.g. ?mode=u8&colors=64)
    POST /v1/decode   .sdc -> image (?format=png|webp|jpeg, else the Accept header; PNG)
    POST /v1/info     .sdc -> JSON, as `sdc-runtime info --json`
    POST /v1/compare  image -> JSON: our decode beside AVIF, JPEG XL and JPEG at no more bytes
    GET  /            the comparison page
    GET  /healthz     liveness
    GET  /metrics     Prometheus: requests by route and status, latency, queue depth, in flight

Bad input is a 4xx with a JSON body {"error": ..., "type": ...}: 400 malformed data, 413 over
the body or pixel limit, 415 not an image, 422 bad options or a file for another model set.
Requests beyond the pool wait in a bounded queue; past it they get 503 with Retry-After.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np
from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from sdc_peers import matched
from sdc_runtime import (
    SdcCodec,
    SdcError,
    SdcFormatError,
    SdcInputError,
    SdcLimitError,
    SdcModelError,
    SdcTargetError,
    container,
    sdc_info,
)
from sdc_runtime import options as encode_options
from sdc_runtime.image import image_bytes, load_image, psnr, to_picture
from sdc_runtime.options import EncodeOptions

from .settings import ServeSettings

PAGE = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
COMPARE_PEERS = ("AVIF", "JPEG XL", "JPEG")
# The comparison returns every panel as a PNG in JSON: a photo-sized page, not a 100 MP one.
COMPARE_MAX_PIXELS = 4 << 20
OUTPUT_FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG", "jpg": "JPEG"}
MEDIA_TYPES = {"PNG": "image/png", "WEBP": "image/webp", "JPEG": "image/jpeg"}


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.kind = status, kind


def _status_of(exc: SdcError, *, image_input: bool = False) -> int:
    if isinstance(exc, SdcLimitError):
        return 413
    if isinstance(exc, SdcFormatError):
        return 400
    if isinstance(exc, SdcInputError):
        return 415 if image_input else 422
    if isinstance(exc, (SdcModelError, SdcTargetError)):
        return 422
    return 400


def parse_options(query) -> dict:
    """The query's encoder options, typed as EncodeOptions declares them (SdcInputError: 422)."""
    specs = {spec.name: spec for spec in encode_options.ENCODE_OPTIONS}
    unknown = sorted(set(query) - set(specs))
    if unknown:
        raise SdcInputError(f"unknown encoder option(s) {', '.join(unknown)}; known: {', '.join(specs)}")
    return {name: specs[name].parse(text) for name, text in query.items()}


class Service:
    """The state of one server process: its codec, its pool, its admission count, its metrics."""

    def __init__(self, codec: SdcCodec, settings: ServeSettings):
        self.codec, self.max_body, self.grace_seconds = codec, settings.max_body, settings.grace_seconds
        # Set when a shutdown's grace period has run out: requests still running then answer 503.
        self.grace_over = asyncio.Event()  # bound to the server's loop at first use (Python 3.10+)
        self._running, self._running_lock = 0, threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="sdc")
        self.capacity = settings.workers + settings.queue  # requests admitted at once: running plus waiting
        self.admitted = 0
        self.registry = CollectorRegistry()
        self.requests = Counter("sdc_requests", "Requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("sdc_request_seconds", "Request latency by route", ["route"],
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self.queue_depth = Gauge("sdc_queue_depth", "Admitted requests waiting for a worker", registry=self.registry)
        self.in_flight = Gauge("sdc_in_flight", "Requests running in the worker pool", registry=self.registry)

    async def body(self, request: Request) -> bytes:
        """The request body, refused (413) as soon as it passes max_body: never read whole first."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise HttpError(413, f"body of {declared} bytes is over the limit of {self.max_body}", "SdcLimitError")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise HttpError(413, f"body over the limit of {self.max_body} bytes", "SdcLimitError")
            chunks.append(chunk)
        if not size:
            raise HttpError(400, "empty request body", "SdcFormatError")
        return b"".join(chunks)

    async def run(self, function, *args):
        """Run neural work in the pool, or refuse at once (503) when the queue is full."""
        if self.admitted >= self.capacity:
            raise HttpError(503, "the server is busy; retry shortly", "Busy")
        self.admitted += 1
        self.queue_depth.inc()
        started = False

        def job():
            nonlocal started
            started = True
            self.queue_depth.dec()
            self.in_flight.inc()
            with self._running_lock:
                self._running += 1
            try:
                return function(*args)
            finally:
                self.in_flight.dec()
                with self._running_lock:
                    self._running -= 1

        try:
            work = asyncio.get_running_loop().run_in_executor(self.pool, job)
            over = asyncio.ensure_future(self.grace_over.wait())
            await asyncio.wait({work, over}, return_when=asyncio.FIRST_COMPLETED)
            over.cancel()
            if not work.done():  # its thread cannot be stopped; its result is no longer wanted
                work.add_done_callback(lambda future: future.exception())
                raise HttpError(503, f"the server is shutting down and this request ran past the"
                                     f" {self.grace_seconds:g} s grace period", "ShuttingDown")
            return work.result()
        finally:
            self.admitted -= 1
            if not started:
                self.queue_depth.dec()

    def begin_shutdown(self) -> None:
        """From a SIGTERM on (called in the event loop's thread): requests still running when
        the grace period ends get 503 instead of being cut."""
        asyncio.get_running_loop().call_later(self.grace_seconds, self.grace_over.set)

    @property
    def busy(self) -> bool:
        """Whether a worker thread still runs a request's work."""
        with self._running_lock:
            return self._running > 0


def create_app(codec: SdcCodec, settings: ServeSettings = ServeSettings()) -> Starlette:
    service = Service(codec, settings)

    def route(path: str, name: str, handler, methods, *, image_input: bool = False):
        """A route with the service's error mapping and metrics.  ``image_input``: the body is an
        image, so the codec refusing it is 415; options are checked first (``options_of``)."""
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                try:
                    response = await handler(request)
                except SdcError as exc:
                    raise HttpError(_status_of(exc, image_input=image_input), str(exc), type(exc).__name__) from None
            except HttpError as exc:
                response = JSONResponse({"error": str(exc), "type": exc.kind}, status_code=exc.status,
                                        headers={"Retry-After": "1"} if exc.status == 503 else None)
            service.requests.labels(name, str(response.status_code)).inc()
            service.latency.labels(name).observe(time.perf_counter() - started)
            return response
        return Route(path, endpoint, methods=methods, name=name)

    def options_of(request: Request) -> EncodeOptions:
        """The query's encoder options, resolved and checked by the codec (422 if bad)."""
        try:
            return codec.options(**parse_options(request.query_params))
        except SdcInputError as exc:
            raise HttpError(422, str(exc), type(exc).__name__) from None

    async def encode(request: Request) -> Response:
        options = options_of(request)
        data = await service.body(request)

        def work():
            image = load_image(data, max_pixels=codec.max_pixels)
            return codec.encode(image, options)
        return Response(await service.run(work), media_type="application/x-sdc")

    async def decode(request: Request) -> Response:
        wanted = request.query_params.get("format")
        if wanted is None:
            accept = request.headers.get("accept", "")
            wanted = next((ext for ext, fmt in OUTPUT_FORMATS.items() if MEDIA_TYPES[fmt] in accept), "png")
        fmt = OUTPUT_FORMATS.get(wanted.lower())
        if fmt is None:
            raise HttpError(422, f"format must be one of {', '.join(OUTPUT_FORMATS)}, not {wanted!r}", "SdcInputError")
        data = await service.body(request)
        container.unpack(data, max_pixels=codec.max_pixels)  # refused before it takes a worker
        image = await service.run(codec.decode, data)
        return Response(image_bytes(image, fmt), media_type=MEDIA_TYPES[fmt])

    async def info(request: Request) -> Response:
        return JSONResponse(sdc_info(await service.body(request)))

    async def compare(request: Request) -> Response:
        options = options_of(request)
        data = await service.body(request)

        def work():
            image = load_image(data, max_pixels=min(codec.max_pixels, COMPARE_MAX_PIXELS))
            original = to_picture(image).rgb
            sdc = codec.encode(original, options)
            return original, len(sdc), np.asarray(codec.decode(sdc))
        original, budget, ours = await service.run(work)
        # The classical codecs at the largest size not over ours, on the server, through imagecodecs.
        peers = await service.run(lambda: {name: matched(name, original, budget) for name in COMPARE_PEERS})
        height, width = original.shape[:2]

        def panel(name, size, pixels):
            if pixels is None:
                return {"name": name, "bytes": None, "bpp": None, "psnr": None, "image": None}
            return {"name": name, "bytes": size, "bpp": 8 * size / (width * height),
                    "psnr": psnr(original, pixels),
                    "image": "data:image/png;base64," + base64.b64encode(image_bytes(Image.fromarray(pixels), "PNG")).decode()}
        panels = [panel("sdcodec", budget, ours)]
        panels += [panel(name, *(result if result else (None, None))) for name, result in peers.items()]
        return JSONResponse({"width": width, "height": height, "panels": panels})

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "fingerprint": codec.manifest.fingerprint[:32]})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # After SIGTERM every request has been answered (or answered 503 at the grace period's
        # end): work still running in the pool is no longer wanted.
        service.pool.shutdown(wait=False, cancel_futures=True)

    async def json_error(request: Request, exc: Exception) -> Response:
        """Starlette's own answers (404, 405) and unexpected failures (500), as JSON too."""
        status = getattr(exc, "status_code", 500)
        message = getattr(exc, "detail", None) or "internal error"
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(status, "HTTPError" if status != 500 else "InternalError")
        headers = getattr(exc, "headers", None)
        return JSONResponse({"error": str(message), "type": kind}, status_code=status, headers=headers)

    app = Starlette(routes=[route("/", "page", page, ["GET"]),
                            route("/v1/compare", "compare", compare, ["POST"], image_input=True),
                            route("/v1/encode", "encode", encode, ["POST"], image_input=True),
                            route("/v1/decode", "decode", decode, ["POST"]),
                            route("/v1/info", "info", info, ["POST"]),
                            route("/healthz", "healthz", healthz, ["GET"]),
                            route("/metrics", "metrics", metrics, ["GET"])],
                    lifespan=lifespan,
                    exception_handlers={HTTPException: json_error, Exception: json_error})
    app.state.service = service
    return app
