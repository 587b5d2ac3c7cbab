"""The Ray Serve application: a FastAPI ingress over batched, multiplexed PaLI replicas.

Endpoints (docs/serving.md): `POST /v1/generate` (JSON or SSE with `"stream": true`), `POST /v1/chat/completions`
and `GET /v1/models` (OpenAI-compatible), `GET /v1/stats`, `GET /healthz`, `GET /` (demo page), `/openapi.json`,
`/docs`. Every bad input is a 4xx `{"error": message}` (OpenAI's error shape under /v1/chat); a full queue is a
503 with Retry-After; a server fault is a 5xx naming a request id (the log has the details).

Decoding runs in one `serve.scheduler.Scheduler` per loaded model (iteration-level batching) or, with
`batching: whole_call`, in `@serve.batch` groups decoded to completion (the previous engine).

`build_app(args)` is the application builder named in `serve/config.yaml`
(`import_path: serve.app:build_app`).
"""


import asyncio
import json
import logging
import os
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pali.data.prompts import SUPPORTED_LANGS
from serve import openai_api as oai
from serve.config import TASKS, AppArgs
from serve.engine import (
    BatchStats,
    Item,
    LoadedModel,
    Result,
    check_params,
    decode_items,
    encode_prompt,
    load_model,
    make_prompt,
)
from serve.features import FeatureCache
from serve.preprocess import InputError, decode_base64
from serve.scheduler import GenRequest, QueueFull, SamplingParams, Scheduler
from serve.streaming import Detokenizer, sse

log = logging.getLogger("ray.serve")
STATIC = Path(__file__).parent / "static"
BATCH_HEADER = "x-pali-batch-size"
TTFT_HEADER = "x-pali-ttft-s"  # seconds from admission to the request's first token (iteration batching)
MODEL_HEADER = "serve_multiplexed_model_id"  # Serve's multiplexed-model header


class GenerateRequest(BaseModel):
    """Body of `POST /v1/generate` (JSON, or the same fields as multipart form fields + an `image` file)."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., description="Base64-encoded JPEG/PNG/WebP (a data: URL prefix is allowed).")
    task: str = Field("caption", description=f"One of {list(TASKS)}.")
    lang: str = Field("en", description="BCP-47 code of the answer's language, e.g. en, fr, zh.")
    prompt: str | None = Field(None, description="The question for vqa, the whole prompt for raw; unused otherwise.")
    max_new_tokens: int | None = Field(None, description="Most tokens generated (default: the model's max_target_len).")
    num_beams: int = Field(1, description="Beam width; 1 = greedy (or sampling when temperature > 0).")
    temperature: float = Field(0.0, description="0 = greedy / beam search; > 0 samples at this temperature.")
    top_k: int = Field(0, description="Sample among the k likeliest tokens (0 = off).")
    top_p: float = Field(1.0, description="Nucleus sampling: the smallest set of tokens reaching this mass.")
    seed: int | None = Field(None, description="Seed of this request's sampling (equal seeds, equal answers).")
    stream: bool = Field(False, description="Answer with server-sent events: text pieces, then the answer.")
    model: str | None = Field(None, description="Model name from GET /v1/models (or the "
                                                "serve_multiplexed_model_id header).")


class GenerateResponse(BaseModel):
    """Answer of `POST /v1/generate`."""

    text: str = Field(..., description="The generated text.")
    lang: str = Field(..., description="Language asked for.")
    model: str = Field(..., description="Model that answered.")
    tokens: list[int] = Field(..., description="Generated token ids (eos included, no padding).")


class ErrorResponse(BaseModel):
    """Every error answer."""

    error: str = Field(..., description="What was wrong and what was expected.")


_MULTIPART_SCHEMA = {
    "type": "object", "required": ["image"],
    "properties": {"image": {"type": "string", "format": "binary"},
                   **{k: {"type": "string"} for k in GenerateRequest.model_fields if k != "image"}},
}
_GENERATE_DOC = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": GenerateRequest.model_json_schema()},
        "multipart/form-data": {"schema": _MULTIPART_SCHEMA}}},
}

api = FastAPI(title="PaLI on Ray Serve", version="0.1.0",
              description="Multilingual captioning, VQA and OCR with a PaLI model. Errors are `{error}` with a "
                          "4xx status.")


class Overloaded(Exception):
    """The replica's queue is full: 503 with Retry-After."""


class ModelUnavailable(Exception):
    """A configured checkpoint could not be loaded: 503."""


class Timeout(Exception):
    """The request ran past `request_timeout_s`: 504."""


def _is_openai(request: Request | None) -> bool:
    return request is not None and request.url.path.startswith("/v1/chat")


def _error(status: int, message: str, request: Request | None = None, headers: dict | None = None,
           request_id: str | None = None) -> JSONResponse:
    body = oai.error_body(message, status, request_id) if _is_openai(request) else {"error": message}
    if request_id and not _is_openai(request):
        body["request_id"] = request_id
    return JSONResponse(body, status_code=status, headers=headers)


def _internal(request: Request | None, what: str, e: BaseException) -> JSONResponse:
    """A 500 naming a request id; the exception goes to the log only (it may name paths or internals)."""
    rid = uuid.uuid4().hex[:16]
    log.error("request %s: %s: %r", rid, what, e, exc_info=e)
    return _error(500, f"internal error ({what}); request id {rid}", request, {"x-request-id": rid}, rid)


@api.exception_handler(InputError)
async def _input_error(request: Request, e: InputError) -> JSONResponse:
    return _error(e.status, str(e), request)


@api.exception_handler(Overloaded)
async def _overloaded(request: Request, e: Overloaded) -> JSONResponse:
    return _error(503, f"server overloaded: {e}; retry later", request, {"Retry-After": "1"})


@api.exception_handler(ModelUnavailable)
async def _unavailable(request: Request, e: ModelUnavailable) -> JSONResponse:
    return _error(503, str(e), request)


@api.exception_handler(Timeout)
async def _timeout(request: Request, e: Timeout) -> JSONResponse:
    return _error(504, str(e), request)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    return _error(422, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()), request)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return _error(e.status_code, str(e.detail), request)


@api.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    return _internal(request, "unexpected error", e)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InputError(f"content-length {declared!r} is not a number")
        if int(declared) > limit:
            raise InputError(f"request body is {declared} bytes; the limit is {limit}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(f"request body exceeds the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> dict:
    """A JSON object body; InputError otherwise."""
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"body is not valid JSON ({e})") from None
    if not isinstance(fields, dict):
        raise InputError(f"body is JSON {type(fields).__name__}; expected an object")
    return fields


async def parse_request(request: Request, limit: int) -> tuple[GenerateRequest, bytes]:
    """(validated fields, encoded image bytes) from a JSON or multipart body."""
    body = await read_body(request, limit)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
        except Exception as e:  # malformed multipart framing
            raise InputError(f"malformed multipart body ({e})") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise InputError("multipart body needs an 'image' file field")
        data = await upload.read()
        fields: dict[str, Any] = {k: v for k, v in form.items() if k != "image" and isinstance(v, str) and v != ""}
        fields["image"] = "-"
    elif ctype in ("application/json", ""):
        fields = parse_json(body)
        data = None
    else:
        raise InputError(f"content-type {ctype!r}; expected application/json or multipart/form-data", 415)
    try:
        req = GenerateRequest.model_validate(fields)
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise InputError(f"invalid request: {msg}", 422) from None
    return req, data if data is not None else decode_base64(req.image)


def _make_metrics() -> dict:
    """Serve metrics (exported with Ray's Prometheus metrics) of the decode loops."""
    from ray.serve import metrics

    return {"queue_length": metrics.Gauge("pali_queue_length", "Requests waiting for a cache row",
                                          tag_keys=("model",)),
            "cache_rows_used": metrics.Gauge("pali_cache_rows_used", "Cache rows decoding", tag_keys=("model",)),
            "tokens_per_s": metrics.Gauge("pali_tokens_per_s", "Generated tokens per second", tag_keys=("model",))}


class Served:
    """A loaded model and its decode loop (what the multiplexed loader returns; Serve calls `__del__` on
    eviction, which lets the loop finish its rows and stop)."""

    def __init__(self, entry: LoadedModel, scheduler: Scheduler | None):
        self.entry, self.scheduler = entry, scheduler

    def __del__(self) -> None:
        if getattr(self, "scheduler", None) is not None:
            self.scheduler.close()


@serve.deployment(name="PaLIServer", ray_actor_options={"num_cpus": 0.5}, health_check_period_s=5,
                  health_check_timeout_s=30)
@serve.ingress(api)
class PaLIServer:
    """One replica: loads checkpoints lazily (LRU over `max_models_per_replica`), one decode loop each."""

    def __init__(self, args: dict[str, Any]):
        self.args = AppArgs.model_validate(args)
        torch.set_num_threads(self.args.torch_threads)
        Image.MAX_IMAGE_PIXELS = self.args.max_image_pixels  # PIL's own guard, behind ours
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.stats = BatchStats()
        self.features = FeatureCache(self.args.feature_cache_bytes) if self.args.feature_cache_bytes else None
        self._active = 0  # generate requests past parsing and not yet answered (one event loop: no lock)
        self._loaded: weakref.WeakValueDictionary[str, Served] = weakref.WeakValueDictionary()
        self._consecutive_failures = 0
        self._warm: Served | None = None
        self._latency: list[tuple[float, float]] = []  # (ttft, latency) of recent requests
        self._metrics = _make_metrics()
        if self.args.preload_default:  # a broken default checkpoint fails the replica; Serve retries it
            self._warm = self._serve(load_model(self.args.default, self.args.models[self.args.default],
                                                self.device, self.args.dtype))
            self._loaded[self._warm.entry.name] = self._warm

        async def _load(model_id: str) -> Served:
            if self._warm is not None and self._warm.entry.name == model_id:
                served, self._warm = self._warm, None
            else:
                self._warm = None  # not yet used: let the LRU cache alone decide what stays in memory
                entry = await asyncio.to_thread(load_model, model_id, self.args.models[model_id], self.device,
                                                self.args.dtype)
                served = self._serve(entry)
            self._loaded[model_id] = served
            return served

        self.get_model = serve.multiplexed(max_num_models_per_replica=self.args.max_models_per_replica)(_load)
        self.generate_batch.set_max_batch_size(self.args.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    def _serve(self, entry: LoadedModel) -> Served:
        a = self.args
        if a.batching == "whole_call":
            return Served(entry, None)
        return Served(entry, Scheduler(entry, rows=a.max_batch_size, max_len=a.max_new_tokens_limit,
                                       max_queued=a.max_queued_requests, features=self.features))

    def check_health(self) -> None:
        """Called by Serve; raising makes Serve replace this replica."""
        if self._consecutive_failures >= 3:
            raise RuntimeError(f"{self._consecutive_failures} decode batches in a row failed")
        for served in list(self._loaded.values()):
            sch = served.scheduler
            if sch is not None and not sch._thread.is_alive() and not sch._closing:
                raise RuntimeError(f"the decode loop of model {served.entry.name!r} stopped")
        if self.device == "cuda":
            torch.cuda.synchronize()  # raises once the CUDA context is broken (e.g. after an Xid error)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def generate_batch(self, items: list[Item]) -> list:
        """Whole-call batching: decode concurrently arriving requests together (grouped by model and params)."""
        return await self._decode(items)

    async def _decode(self, items: list[Item]) -> list:
        results, sizes = await asyncio.to_thread(decode_items, items)
        for it in items:  # Serve's batch queue keeps the last batch's arguments until the next batch:
            it.entry, it.image, it.pixels = None, None, None  # do not let them pin an evicted model
        self.stats.record(sizes)
        # a bad image (InputError, a 4xx for its request alone) is the client's fault, not a failed decode
        failed = [r for r in results if r.error is not None and not isinstance(r.error, InputError)]
        self.stats.failures += len(failed)
        self._consecutive_failures = self._consecutive_failures + 1 if failed else 0
        return results

    # --- the decode loop's side --------------------------------------------------------------------
    def _submit(self, served: Served, ids: list[int], data: bytes, params: SamplingParams,
                stream: bool) -> tuple[GenRequest, asyncio.Queue]:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(kind: str, value: Any) -> None:  # called on the decode thread
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        req = GenRequest(ids, data, params, emit, stream=stream, max_image_pixels=self.args.max_image_pixels)
        try:
            served.scheduler.submit(req)
        except QueueFull as e:
            raise Overloaded(str(e)) from None
        if self._active == 1:
            self.stats.unbatched_alone += 1
        return req, events

    async def _events(self, served: Served, req: GenRequest, events: asyncio.Queue) -> AsyncIterator[tuple]:
        """The request's events until it finishes; a timeout or a client that went away frees its row."""
        deadline = time.monotonic() + self.args.request_timeout_s
        try:
            while True:
                try:
                    async with asyncio.timeout(deadline - time.monotonic()):
                        kind, value = await events.get()
                except TimeoutError:
                    raise Timeout(f"no answer within request_timeout_s={self.args.request_timeout_s}") from None
                if kind == "done":
                    self._finished(served, req, value)
                yield kind, value
                if kind in ("done", "error"):
                    return
        finally:
            if req.state != "finished":
                served.scheduler.cancel(req)

    def _finished(self, served: Served, req: GenRequest, result: Result) -> None:
        self.stats.record_request(result.batch_size)
        self._latency.append((req.first_token_s or 0.0, time.perf_counter() - req.submitted))
        del self._latency[:-512]
        snap = served.scheduler.snapshot()
        tags = {"model": served.entry.name}
        for name in ("queue_length", "cache_rows_used", "tokens_per_s"):
            self._metrics[name].set(snap[name], tags=tags)

    def _check_error(self, request: Request, value: Exception) -> JSONResponse:
        if isinstance(value, InputError):
            raise value
        self.stats.failures += 1
        return _internal(request, "decoding failed", value)

    async def _first(self, request: Request, it: AsyncIterator[tuple]) -> tuple:
        """The first event (so that a bad image is a 4xx before a stream starts)."""
        kind, value = await anext(it)
        if kind == "error":
            return kind, self._check_error(request, value)
        return kind, value

    async def _start(self, request: Request, served: Served, ids: list[int], data: bytes, params: SamplingParams,
                     stream: bool) -> tuple[GenRequest, AsyncIterator[tuple], tuple]:
        """Submit a request to the decode loop and wait for its first event: (the request, its events, the first
        (kind, value)); value is an error Response when the request failed before its first token."""
        self._active += 1
        try:
            req, events = self._submit(served, ids, data, params, stream=stream)
            it = self._events(served, req, events)
            return req, it, await self._first(request, it)
        finally:
            self._active -= 1

    # --- endpoints --------------------------------------------------------------------------------------
    async def _model(self, name: str) -> Served:
        if name not in self.args.models:
            raise InputError(f"unknown model {name!r}; expected one of {sorted(self.args.models)}", 404)
        try:
            return await self.get_model(name)
        except Exception as e:  # a configured checkpoint that cannot load is the server's fault
            log.error("model %r could not be loaded: %r", name, e)
            raise ModelUnavailable(f"model {name!r} could not be loaded (see the replica log)") from None

    @api.post("/v1/generate", response_model=GenerateResponse, openapi_extra=_GENERATE_DOC,
              responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                         413: {"model": ErrorResponse}, 415: {"model": ErrorResponse},
                         422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def generate(self, request: Request) -> Response:
        """Caption / answer / read one image. JSON body with base64 `image`, or a multipart upload;
        `"stream": true` answers with server-sent events (text pieces, then `event: done` with the answer)."""
        req, data = await parse_request(request, self.args.max_body_bytes)
        name = req.model or serve.get_multiplexed_model_id() or self.args.default
        if name not in self.args.models:
            raise InputError(f"unknown model {name!r}; expected one of {sorted(self.args.models)}", 404)
        prompt = make_prompt(req.task, req.lang, req.prompt)
        served = await self._model(name)
        entry = served.entry
        max_new = req.max_new_tokens if req.max_new_tokens is not None else entry.model.cfg.max_target_len
        params = check_params(max_new, req.num_beams, req.temperature, top_k=req.top_k, top_p=req.top_p,
                              max_new_tokens_limit=self.args.max_new_tokens_limit,
                              max_beams=self.args.max_beams, max_temperature=self.args.max_temperature)
        ids = encode_prompt(entry, prompt)
        if not data:
            raise InputError("image is empty; expected JPEG/PNG bytes")
        if served.scheduler is None:
            if req.stream:
                raise InputError("stream=true needs batching: iteration (this server runs whole_call)")
            if req.seed is not None and params.temperature > 0:
                raise InputError("seed needs batching: iteration (this server runs whole_call, whose batches "
                                 "share one random stream)")
            return await self._generate_whole_call(request, served, ids, data, params, req, name)
        greq, it, (kind, value) = await self._start(request, served, ids, data, SamplingParams.of(params, req.seed),
                                                    req.stream)
        if isinstance(value, Response):
            return value
        if req.stream:
            return StreamingResponse(self._sse_generate(it, (kind, value), entry, req, name),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})
        result = value
        del served, entry
        body = json.dumps({"text": result.text, "lang": req.lang, "model": name, "tokens": result.tokens},
                          ensure_ascii=False).encode()
        return Response(body, media_type="application/json",
                        headers={BATCH_HEADER: str(result.batch_size), TTFT_HEADER: f"{greq.first_token_s or 0:.4f}"})

    async def _sse_generate(self, it: AsyncIterator[tuple], first: tuple, entry: LoadedModel,
                            req: GenerateRequest, name: str) -> AsyncIterator[str]:
        det = Detokenizer(entry.tokenizer)
        pending = [first]
        try:
            while True:
                kind, value = pending.pop() if pending else await anext(it)
                if kind == "token":
                    piece = det.push(value)
                    if piece:
                        yield sse({"text": piece})
                elif kind == "done":
                    piece = det.finish(value.text)
                    if piece:
                        yield sse({"text": piece})
                    yield sse({"text": value.text, "lang": req.lang, "model": name, "tokens": value.tokens,
                               "batch_size": value.batch_size}, event="done")
                    return
                else:
                    yield sse({"error": str(value) if isinstance(value, InputError) else "decoding failed"},
                              event="error")
                    return
        except Timeout as e:
            yield sse({"error": str(e)}, event="error")
        finally:
            await it.aclose()

    async def _generate_whole_call(self, request: Request, served: Served, ids: list[int], data: bytes,
                                   params: Any, req: GenerateRequest, name: str) -> Response:
        # The image is decoded and resized inside the batch (serve.engine.prepare_pixels, one thread hop
        # per batch): per-request work on this event loop is what caps batching on small machines.
        item = Item(served.entry, None, ids, params, image=data, max_image_pixels=self.args.max_image_pixels)
        del served
        self._active += 1
        try:
            if self._active == 1 and self.args.max_batch_size > 1:
                # Nothing else in flight: no batch can form, so skip the batch wait (up to
                # batch_wait_timeout_s) a lone request would otherwise sit through.
                self.stats.unbatched_alone += 1
                result = (await self._decode([item]))[0]
            else:
                result = await self.generate_batch(item)
        finally:
            self._active -= 1
        del item  # an InputError raised below keeps this frame (and so the model) in its traceback
        if isinstance(result.error, InputError):
            raise result.error
        if result.error is not None:
            return _internal(request, "decoding failed", result.error)
        # Serialised directly (GenerateResponse documents the shape): no model round trip per request.
        body = json.dumps({"text": result.text, "lang": req.lang, "model": name, "tokens": result.tokens},
                          ensure_ascii=False).encode()
        return Response(body, media_type="application/json", headers={BATCH_HEADER: str(result.batch_size)})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        """OpenAI-compatible chat completion: the last user message's text is the prompt (task raw), its
        image_url part the image (a data: URL). `stream: true` answers with `chat.completion.chunk` events."""
        body = parse_json(await read_body(request, self.args.max_body_bytes))
        try:
            creq = oai.ChatRequest.model_validate(body)
        except ValidationError as e:
            raise InputError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
        name = creq.model or serve.get_multiplexed_model_id() or self.args.default
        fetch = {"hosts": self.args.image_fetch_hosts, "max_bytes": self.args.image_fetch_max_bytes,
                 "timeout_s": self.args.image_fetch_timeout_s}
        prompt, data = await asyncio.to_thread(oai.parse_messages, creq, fetch) if self.args.image_fetch_hosts \
            else oai.parse_messages(creq, fetch)
        stops = oai.stop_list(creq)
        served = await self._model(name)
        if served.scheduler is None:
            raise InputError("/v1/chat/completions needs batching: iteration (this server runs whole_call)")
        entry = served.entry
        max_new = oai.max_tokens(creq) or entry.model.cfg.max_target_len
        temperature = creq.temperature or 0.0
        params = check_params(max_new, 1, temperature, top_p=creq.top_p if temperature > 0 and creq.top_p else 1.0,
                              max_new_tokens_limit=self.args.max_new_tokens_limit, max_beams=1,
                              max_temperature=self.args.max_temperature)
        ids = encode_prompt(entry, prompt)
        rid = "chatcmpl-" + uuid.uuid4().hex[:24]
        visual = entry.model.cfg.vision.num_tokens
        greq, it, (kind, value) = await self._start(request, served, ids, data, SamplingParams.of(params, creq.seed),
                                                    creq.stream)
        if isinstance(value, Response):
            return value

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(ids) + visual, "completion_tokens": n,
                    "total_tokens": len(ids) + visual + n}

        def finish_reason(tokens: list[int], stopped: bool) -> str:
            eos = entry.model.cfg.text.eos_token_id
            return "stop" if stopped or (tokens and tokens[-1] == eos) else "length"

        if not creq.stream:
            text, stopped = oai.cut_at_stop(value.text, stops)
            return JSONResponse(oai.completion(rid, name, text, finish_reason(value.tokens, stopped),
                                               usage(len(value.tokens))))
        include_usage = bool((creq.stream_options or {}).get("include_usage"))
        return StreamingResponse(self._sse_chat(it, (kind, value), entry, rid, name, stops, usage, finish_reason,
                                                include_usage), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    async def _sse_chat(self, it, first, entry, rid, name, stops, usage, finish_reason, include_usage
                        ) -> AsyncIterator[str]:
        det = Detokenizer(entry.tokenizer)
        hold = max((len(s) for s in stops), default=1) - 1  # a stop string may still be forming
        sent, pending, tokens = "", [first], []
        yield oai.chunk(rid, name, {"role": "assistant", "content": ""})
        try:
            while True:
                kind, value = pending.pop() if pending else await anext(it)
                if kind == "error":
                    msg = str(value) if isinstance(value, InputError) else "decoding failed"
                    yield f"data: {json.dumps(oai.error_body(msg, 500))}\n\n"
                    return
                done = kind == "done"
                if done:
                    det.finish(value.text)
                    tokens = value.tokens
                else:
                    det.push(value)
                    tokens = value
                text, stopped = oai.cut_at_stop(det.sent, stops)
                safe = text if done or stopped else text[: max(len(sent), len(text) - hold)]
                if len(safe) > len(sent):
                    yield oai.chunk(rid, name, {"content": safe[len(sent):]})
                    sent = safe
                if done or stopped:
                    yield oai.chunk(rid, name, {}, finish_reason(tokens, stopped))
                    if include_usage:
                        body = json.loads(oai.chunk(rid, name, {})[6:])
                        body["choices"], body["usage"] = [], usage(len(tokens))
                        yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        except Timeout as e:
            yield f"data: {json.dumps(oai.error_body(str(e), 504))}\n\n"
        finally:
            await it.aclose()

    @api.get("/v1/models")
    async def models(self) -> dict:
        """Configured models in OpenAI's list shape (`data`), plus size facts of those loaded in this
        replica, tasks and languages (`models`). No server paths."""
        out = []
        for name in self.args.models:
            served = self._loaded.get(name)
            info: dict[str, Any] = {"name": name, "loaded": served is not None}
            if served is not None:
                entry = served.entry
                info.update(preset=entry.model.cfg.name, image_size=entry.image_size,
                            max_text_len=entry.max_text_len)
            out.append(info)
        return {"object": "list", "data": oai.models_list(list(self.args.models)), "models": out,
                "default": self.args.default, "tasks": list(TASKS), "languages": list(SUPPORTED_LANGS)}

    @api.get("/v1/stats")
    async def batch_stats(self) -> dict:
        """Batching, queue, cache and latency statistics of the replica that answers."""
        engines = {n: s.scheduler.snapshot() for n, s in list(self._loaded.items()) if s.scheduler is not None}
        total = {k: sum(e[k] for e in engines.values()) for k in
                 ("queue_length", "running", "cache_rows", "cache_rows_used", "cache_tokens", "cache_tokens_used",
                  "tokens_generated", "tokens_per_s", "cancelled", "rejected")}
        lat = sorted(x[1] for x in self._latency)
        ttft = sorted(x[0] for x in self._latency)

        def pct(v: list[float], q: float) -> float | None:
            return round(v[min(len(v) - 1, int(q * len(v)))], 4) if v else None

        return {"replica": serve.get_replica_context().replica_id.unique_id, "device": self.device,
                "batching": self.args.batching, "max_batch_size": self.args.max_batch_size,
                "max_queued_requests": self.args.max_queued_requests, **self.stats.as_dict(), **total,
                "latency_p50_s": pct(lat, 0.5), "latency_p99_s": pct(lat, 0.99), "ttft_p50_s": pct(ttft, 0.5),
                "ttft_p99_s": pct(ttft, 0.99), "engines": engines,
                "feature_cache": self.features.as_dict() if self.features is not None else None}

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Liveness: 200 while this replica can serve, 503 when its health check fails."""
        try:
            self.check_health()
        except RuntimeError as e:
            return _error(503, f"unhealthy: {e}")
        return JSONResponse({"status": "ok", "default_model": self.args.default})

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(self) -> HTMLResponse:
        """The demo page."""
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))


def build_app(args: dict[str, Any] | AppArgs) -> serve.Application:
    """The Serve application for `args` (the builder of `serve run` / `serve deploy`).

    Checks that every checkpoint exists, picks GPU replicas when the cluster has GPUs (num_gpus='auto')
    and applies replica count or autoscaling, `max_ongoing_requests` and CPU reservation. Settings in a
    config file's `deployments:` block override these.
    """
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    # Replicas do not share the caller's working directory: make local paths absolute here.
    a = a.model_copy(update={"models": {n: d if "://" in d else os.path.abspath(d) for n, d in a.models.items()}})
    a.check_checkpoints()
    num_gpus = a.num_gpus
    if num_gpus == "auto":
        import ray

        num_gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0
    actor: dict[str, Any] = {"num_cpus": a.num_cpus, "num_gpus": num_gpus}
    if not a.separate_user_thread:  # read by Serve when the replica process starts
        actor["runtime_env"] = {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}
    opts: dict[str, Any] = {"max_ongoing_requests": a.max_ongoing_requests,
                            "max_constructor_retry_count": a.max_constructor_retry_count,
                            "ray_actor_options": actor}
    if a.num_replicas:
        opts["num_replicas"] = a.num_replicas
    else:
        opts["autoscaling_config"] = a.autoscaling.to_serve()
    return PaLIServer.options(**opts).bind(a.model_dump(mode="json"))
