"""The Ray Serve application: a FastAPI ingress over batched, multiplexed PaLI replicas.

Endpoints (docs/design.md "HTTP API"): `POST /v1/generate`, `GET /v1/models`, `GET /v1/stats`, `GET /healthz`,
`GET /` (demo page), `/openapi.json`, `/docs`. Every bad input is a 4xx `{"error": message}`.

`build_app(args)` is the application builder named in `serve/config.yaml`
(`import_path: serve.app:build_app`).
"""


import asyncio
import json
import logging
import os
import weakref
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pali.data.prompts import SUPPORTED_LANGS
from serve.config import TASKS, AppArgs
from serve.engine import (
    BatchStats,
    Item,
    LoadedModel,
    check_params,
    decode_items,
    encode_prompt,
    load_model,
    make_prompt,
)
from serve.preprocess import InputError, decode_base64

log = logging.getLogger("ray.serve")
STATIC = Path(__file__).parent / "static"
BATCH_HEADER = "x-pali-batch-size"
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


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@api.exception_handler(InputError)
async def _input_error(_: Request, e: InputError) -> JSONResponse:
    return _error(e.status, str(e))


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    return _error(422, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    return _error(e.status_code, str(e.detail))


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
        try:
            fields = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"body is not valid JSON ({e})") from None
        if not isinstance(fields, dict):
            raise InputError(f"body is JSON {type(fields).__name__}; expected an object")
        data = None
    else:
        raise InputError(f"content-type {ctype!r}; expected application/json or multipart/form-data", 415)
    try:
        req = GenerateRequest.model_validate(fields)
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise InputError(f"invalid request: {msg}", 422) from None
    return req, data if data is not None else decode_base64(req.image)


@serve.deployment(name="PaLIServer", ray_actor_options={"num_cpus": 0.5}, health_check_period_s=5,
                  health_check_timeout_s=30)
@serve.ingress(api)
class PaLIServer:
    """One replica: loads checkpoints lazily (LRU over `max_models_per_replica`) and decodes in batches."""

    def __init__(self, args: dict[str, Any]):
        self.args = AppArgs.model_validate(args)
        torch.set_num_threads(self.args.torch_threads)
        Image.MAX_IMAGE_PIXELS = self.args.max_image_pixels  # PIL's own guard, behind ours
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.stats = BatchStats()
        self._active = 0  # generate requests past parsing and not yet answered (one event loop: no lock)
        self._loaded: weakref.WeakValueDictionary[str, LoadedModel] = weakref.WeakValueDictionary()
        self._consecutive_failures = 0
        self._warm: LoadedModel | None = None
        if self.args.preload_default:  # a broken default checkpoint fails the replica; Serve retries it
            self._warm = load_model(self.args.default, self.args.models[self.args.default], self.device,
                                    self.args.dtype)
            self._loaded[self._warm.name] = self._warm

        async def _load(model_id: str) -> LoadedModel:
            if self._warm is not None and self._warm.name == model_id:
                entry, self._warm = self._warm, None
            else:
                self._warm = None  # not yet used: let the LRU cache alone decide what stays in memory
                entry = await asyncio.to_thread(load_model, model_id, self.args.models[model_id], self.device,
                                                self.args.dtype)
            self._loaded[model_id] = entry
            return entry

        self.get_model = serve.multiplexed(max_num_models_per_replica=self.args.max_models_per_replica)(_load)
        self.generate_batch.set_max_batch_size(self.args.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    def check_health(self) -> None:
        """Called by Serve; raising makes Serve replace this replica."""
        if self._consecutive_failures >= 3:
            raise RuntimeError(f"{self._consecutive_failures} decode batches in a row failed")
        if self.device == "cuda":
            torch.cuda.synchronize()  # raises once the CUDA context is broken (e.g. after an Xid error)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def generate_batch(self, items: list[Item]) -> list:
        """Decode concurrently arriving requests together (grouped by model and decoding parameters)."""
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

    # --- endpoints --------------------------------------------------------------------------------------
    @api.post("/v1/generate", response_model=GenerateResponse, openapi_extra=_GENERATE_DOC,
              responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                         413: {"model": ErrorResponse}, 415: {"model": ErrorResponse},
                         422: {"model": ErrorResponse}})
    async def generate(self, request: Request) -> JSONResponse:
        """Caption / answer / read one image. JSON body with base64 `image`, or a multipart upload."""
        req, data = await parse_request(request, self.args.max_body_bytes)
        name = req.model or serve.get_multiplexed_model_id() or self.args.default
        if name not in self.args.models:
            raise InputError(f"unknown model {name!r}; expected one of {sorted(self.args.models)}", 404)
        prompt = make_prompt(req.task, req.lang, req.prompt)
        try:
            entry = await self.get_model(name)
        except Exception as e:  # a configured checkpoint that cannot load is the server's fault
            return _error(503, f"model {name!r} could not be loaded: {e}")
        max_new = req.max_new_tokens if req.max_new_tokens is not None else entry.model.cfg.max_target_len
        params = check_params(max_new, req.num_beams,
                              req.temperature, max_new_tokens_limit=self.args.max_new_tokens_limit,
                              max_beams=self.args.max_beams, max_temperature=self.args.max_temperature)
        ids = encode_prompt(entry, prompt)
        if not data:
            raise InputError("image is empty; expected JPEG/PNG bytes")
        # The image is decoded and resized inside the batch (serve.engine.prepare_pixels, one thread hop
        # per batch): per-request work on this event loop is what caps batching on small machines.
        item = Item(entry, None, ids, params, image=data, max_image_pixels=self.args.max_image_pixels)
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
        del item, entry  # an InputError raised below keeps this frame (and so the model) in its traceback
        if isinstance(result.error, InputError):
            raise result.error
        if result.error is not None:
            log.error("decoding failed: %r", result.error)
            return _error(500, f"decoding failed: {result.error}")
        # Serialised directly (GenerateResponse documents the shape): no model round trip per request.
        body = json.dumps({"text": result.text, "lang": req.lang, "model": name, "tokens": result.tokens},
                          ensure_ascii=False).encode()
        return Response(body, media_type="application/json", headers={BATCH_HEADER: str(result.batch_size)})

    @api.get("/v1/models")
    async def models(self) -> dict:
        """Configured models (with size facts of those loaded in this replica), tasks and languages."""
        out = []
        for name, path in self.args.models.items():
            entry = self._loaded.get(name)
            info: dict[str, Any] = {"name": name, "checkpoint": path, "loaded": entry is not None}
            if entry is not None:
                info.update(preset=entry.model.cfg.name, image_size=entry.image_size,
                            max_text_len=entry.max_text_len)
            out.append(info)
        return {"models": out, "default": self.args.default, "tasks": list(TASKS),
                "languages": list(SUPPORTED_LANGS)}

    @api.get("/v1/stats")
    async def batch_stats(self) -> dict:
        """Batching statistics of the replica that answers (generate calls by batch size)."""
        return {"replica": serve.get_replica_context().replica_id.unique_id, "device": self.device,
                "max_batch_size": self.args.max_batch_size, **self.stats.as_dict()}

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
