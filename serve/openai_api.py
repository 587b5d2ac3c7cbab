"""OpenAI-compatible request and response shapes of `POST /v1/chat/completions` and `GET /v1/models`.

The last user message is the request: its `text` parts joined are the PaLI prompt as given (task `raw`),
its one `image_url` part is the image. Image URLs are `data:` URLs with base64 bytes; an http(s) URL is
refused unless the operator allow-listed its host (`AppArgs.image_fetch_hosts`), and then fetched with a
size limit, a timeout and no redirects.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serve.preprocess import InputError, decode_base64


class ChatRequest(BaseModel):
    """Body of `POST /v1/chat/completions` (the subset PaLI can honour; unknown OpenAI fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[dict[str, Any]] = Field(..., min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None


def error_body(message: str, status: int, request_id: str | None = None) -> dict:
    """OpenAI's error shape."""
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
            503: "server_overloaded"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    err: dict[str, Any] = {"message": message, "type": kind, "param": None, "code": None}
    if request_id:
        err["request_id"] = request_id
    return {"error": err}


def fetch_image(url: str, hosts: list[str], max_bytes: int, timeout_s: float) -> bytes:
    """Bytes of an http(s) image URL whose host is allow-listed; InputError otherwise."""
    parsed = urllib.parse.urlsplit(url)
    if not hosts:
        raise InputError("image_url is an http(s) URL; this server does not fetch URLs (send a data: URL with "
                         "base64 image bytes)")
    if parsed.scheme not in ("http", "https") or parsed.hostname not in hosts:
        raise InputError(f"image_url host {parsed.hostname!r} is not allowed; expected one of {sorted(hosts)}")

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):  # a redirect could leave the allow-list
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=timeout_s) as r:
            data = r.read(max_bytes + 1)
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise InputError(f"image_url could not be fetched ({e})") from None
    if len(data) > max_bytes:
        raise InputError(f"image_url is over {max_bytes} bytes", 413)
    return data


def parse_messages(req: ChatRequest, fetch: dict[str, Any]) -> tuple[str, bytes]:
    """(prompt, image bytes) from the last user message; InputError naming what is missing."""
    if req.n != 1:
        raise InputError(f"n={req.n}; only n=1 is supported")
    user = [m for m in req.messages if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise InputError("messages has no user message; expected one with a text and an image_url part")
    content = user[-1].get("content")
    if isinstance(content, str) or not isinstance(content, list):
        raise InputError("the user message needs content parts: a text part and an image_url part")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            iu = part.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            if not isinstance(url, str) or not url:
                raise InputError("image_url part without a url")
            images.append(url)
        else:
            raise InputError(f"content part type {kind!r}; expected 'text' or 'image_url'")
    if len(images) != 1:
        raise InputError(f"the user message has {len(images)} images; expected exactly one image_url part")
    prompt = " ".join(t for t in texts if t).strip()
    if not prompt:
        raise InputError("the user message has no text; expected the prompt as a text part")
    url = images[0]
    if url.startswith("data:"):
        return prompt, decode_base64(url)
    if url.startswith(("http://", "https://")):
        return prompt, fetch_image(url, **fetch)
    raise InputError(f"image_url {url[:32]!r}...; expected a data: URL (base64) or an allowed http(s) URL")


def max_tokens(req: ChatRequest) -> int | None:
    """max_completion_tokens, else max_tokens."""
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def stop_list(req: ChatRequest) -> list[str]:
    """The stop strings (at most 4, as OpenAI allows)."""
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise InputError("stop: expected at most 4 non-empty strings")
    return stops


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string, and whether one occurred."""
    hits = [text.index(s) for s in stops if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def completion(rid: str, model: str, text: str, finish: str, usage: dict) -> dict:
    """A `chat.completion` object."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}], "usage": usage}


def chunk(rid: str, model: str, delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
    """One `chat.completion.chunk` server-sent event."""
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                         "logprobs": None}]}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def models_list(names: list[str]) -> list[dict]:
    """`GET /v1/models` entries in OpenAI's shape (names only: no server paths)."""
    return [{"id": n, "object": "model", "created": 0, "owned_by": "pali"} for n in names]
