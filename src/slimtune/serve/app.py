"""The OpenAI-compatible HTTP API over the engine (FastAPI; `slimtune serve` runs it with uvicorn).

    GET  /v1/models                 the base, every known adapter, every adapter:gist pair
    POST /v1/completions            prompt -> text (stream: server-sent events)
    POST /v1/chat/completions       messages -> the tokenizer's chat template -> text
    GET  /health                    ok, and what runs
    GET  /metrics                   Prometheus text: requests, tokens, tokens/s, queue, rows, adapters
    POST /v1/adapters               {"name", "path"}: load an adapter at run time
    DELETE /v1/adapters/{name}      unload it

`model` selects the base (its name, or "base"), an adapter, or "adapter:gist", a saved gist
cache standing in for the instruction (the system prompt): the request's prompt, or the
conversation's last user message, is then the input after the gists.

Every error is a 4xx in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: a body
that is not JSON or too large, an unknown field value, an unknown model, a prompt or
max_tokens beyond the bounds, a full queue (429), a wrong API key (401). A client that goes
away mid-stream frees its row at the next step. (No `from __future__ import annotations` here:
FastAPI reads the handlers' annotations at run time.)
"""

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from ..data.templates import gist_prompt
from ..errors import Problems
from .engine import Engine, QueueFull, Request
from .pool import AdapterPool


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    api_key: str | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _field(body: dict, name: str, kind, default=None, low=None, high=None):
    """A request field of the right JSON type and range, or an ApiError naming it."""
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ApiError(400, f"'{name}' must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}", name)
    if low is not None and value < low or high is not None and value > high:
        raise ApiError(400, f"'{name}'={value} is out of range [{low}, {high}]", name)
    return value


class Service:
    """What the endpoints do, apart from HTTP: parse, validate, submit, collect."""

    def __init__(self, engine: Engine, pool: AdapterPool, base_name: str, limits: Limits):
        self.engine, self.pool, self.base_name, self.limits = engine, pool, base_name, limits
        self.tok = engine.tok
        self.rejected = 0

    def models(self) -> list[str]:
        return [self.base_name] + self.pool.models()

    def resolve(self, model) -> tuple[str | None, object]:
        """(adapter name or None, gist cache or None) for a request's `model`."""
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required: the base, an adapter or adapter:gist", "model")
        if model in (self.base_name, "base"):
            return None, None
        if model in self.pool.gists:
            adapter, cache = self.pool.gists[model]
            return adapter, cache
        if model in self.pool.known:
            return model, None
        raise ApiError(404, f"model {model!r} does not exist; available: {self.models()}", "model",
                       "model_not_found")

    def request(self, body, chat: bool) -> tuple[Request, dict]:
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        adapter, gist = self.resolve(body.get("model"))
        max_tokens = _field(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens", int,
                            16 if not chat else self.limits.max_tokens, 1, self.limits.max_tokens)
        temperature = _field(body, "temperature", float, 1.0, 0.0, 2.0)
        top_p = _field(body, "top_p", float, 1.0, 0.0, 1.0)
        if top_p == 0.0:
            raise ApiError(400, "'top_p' must be above 0", "top_p")
        seed = _field(body, "seed", int, None)
        _field(body, "n", int, 1, 1, 1)  # one choice per request
        stream = _field(body, "stream", bool, False)
        ignore_eos = _field(body, "ignore_eos", bool, False)
        for name in ("stop", "tools", "logprobs", "suffix", "echo"):
            if body.get(name):
                raise ApiError(400, f"'{name}' is not supported by this server", name)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "'messages' must be a non-empty list of {role, content}", "messages")
            for i, m in enumerate(messages):
                if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                        and isinstance(m.get("content"), str)):
                    raise ApiError(400, f"messages[{i}] must be {{'role': system|user|assistant, 'content': string}}",
                                   "messages")
            if gist is not None:
                users = [m["content"] for m in messages if m["role"] == "user"]
                ids = self._input_ids(users[-1] if users else "")
            elif getattr(self.tok, "chat_template", None):
                ids = list(self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)["input_ids"])
            else:
                raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions", "messages")
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ApiError(400, "'prompt' must be a string", "prompt")
            ids = self._input_ids(prompt) if gist is not None else self.tok(prompt)["input_ids"]
        if not ids:
            raise ApiError(400, "the prompt is empty", "messages" if chat else "prompt")
        if len(ids) > self.limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, more than this server's "
                           f"{self.limits.max_prompt_tokens}", "messages" if chat else "prompt", "context_length_exceeded")
        req = Request(list(ids), adapter, gist, max_tokens, temperature, top_p, seed, ignore_eos)
        return req, {"stream": stream, "model": body["model"]}

    def _input_ids(self, text: str) -> list[int]:
        """The input part of the gist template, after the cached gists."""
        return self.tok(gist_prompt("", text, 1)[1], add_special_tokens=False)["input_ids"]

    def submit(self, req: Request, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        out: asyncio.Queue = asyncio.Queue()
        req.emit = lambda t: loop.call_soon_threadsafe(out.put_nowait, t)
        try:
            self.engine.submit(req)
        except QueueFull as e:
            self.rejected += 1
            raise ApiError(429, f"the server is busy ({e}); retry later", code="rate_limit_exceeded",
                           kind="rate_limit_error") from None
        return out

    def metrics(self) -> str:
        e = self.engine
        lines = ["# TYPE slimtune_requests_total counter", f"slimtune_requests_total {e.stats['requests']}",
                 "# TYPE slimtune_requests_rejected_total counter", f"slimtune_requests_rejected_total {self.rejected}",
                 "# TYPE slimtune_generated_tokens_total counter", f"slimtune_generated_tokens_total {e.stats['tokens']}",
                 "# TYPE slimtune_tokens_per_second gauge", f"slimtune_tokens_per_second {e.tokens_per_s():.3f}",
                 "# TYPE slimtune_queue_length gauge", f"slimtune_queue_length {e.waiting.qsize()}",
                 "# TYPE slimtune_running_rows gauge", f"slimtune_running_rows {e.running}",
                 "# TYPE slimtune_adapters_loaded gauge", f"slimtune_adapters_loaded {len(self.pool.loaded)}",
                 "# TYPE slimtune_adapter_requests_total counter"]
        lines += [f'slimtune_adapter_requests_total{{adapter="{a}"}} {n}' for a, n in sorted(e.adapter_requests.items())]
        return "\n".join(lines) + "\n"


def build_app(service: Service):
    """The FastAPI application over a Service."""
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="slimtune", docs_url=None, redoc_url=None, openapi_url=None)
    limits = service.limits

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def unexpected(_, e: Exception):  # never a bare 500 page: the error in OpenAI's shape
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").body(),
                            status_code=500)

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next):
        if limits.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {limits.api_key}":
                return JSONResponse(ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                                             code="invalid_api_key", kind="authentication_error").body(), 401)
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > limits.max_body_bytes):
            return JSONResponse(ApiError(413, f"the body is larger than {limits.max_body_bytes} bytes").body(), 413)
        return await call_next(request)

    async def body_of(request: HttpRequest):
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:
            raise ApiError(413, f"the body is larger than {limits.max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None

    @app.get("/health")
    async def health():
        ok = service.engine._thread is not None and service.engine._thread.is_alive()
        return JSONResponse({"status": "ok" if ok else "down", "running": service.engine.running,
                             "queued": service.engine.waiting.qsize(), "adapters_loaded": list(service.pool.loaded)},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "slimtune"}
                                           for m in service.models()]}

    @app.post("/v1/adapters")
    async def load(request: HttpRequest):
        body = await body_of(request)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not isinstance(body.get("path"), str):
            raise ApiError(400, "give {'name': string, 'path': adapter directory}")
        try:
            service.pool.register(body["name"], body["path"])
        except Exception as e:
            raise ApiError(400, str(e)) from None
        return {"loaded": body["name"]}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        if name not in service.pool.known:
            raise ApiError(404, f"adapter {name!r} is not known", code="model_not_found")
        service.pool.known.pop(name)
        for key in [k for k, (a, _) in service.pool.gists.items() if a == name]:
            service.pool.gists.pop(key)

        def unload():  # on the engine's thread, once no running row uses it
            if name in service.engine.in_use():
                service.engine.call_later(unload)
            else:
                service.pool.unload(name)

        service.engine.call_later(unload)
        return {"unloaded": name}

    async def run(request: HttpRequest, chat: bool):
        req, meta = service.request(await body_of(request), chat)
        out = service.submit(req, asyncio.get_running_loop())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def chunk(text: str, finish: str | None) -> dict:
            choice = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = {"content": text} if text or finish is None else {}
            else:
                choice["text"] = text
            return {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created, "model": meta["model"],
                    "choices": [choice]}

        if meta["stream"]:
            async def events():
                done = False
                try:
                    if chat:
                        first = chunk("", None)
                        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                        yield f"data: {json.dumps(first)}\n\n"
                    sent = ""
                    while True:
                        t = await out.get()
                        if t is None:
                            break
                        text = service.tok.decode(req.tokens[: len(req.tokens)], skip_special_tokens=True)
                        if text.endswith("\ufffd"):
                            continue  # an incomplete character: wait for the rest
                        yield f"data: {json.dumps(chunk(text[len(sent):], None))}\n\n"
                        sent = text
                    final = service.tok.decode([t for t in req.tokens if t != service.engine.eos],
                                               skip_special_tokens=True)
                    if len(final) > len(sent):
                        yield f"data: {json.dumps(chunk(final[len(sent):], None))}\n\n"
                    yield f"data: {json.dumps(chunk('', req.finish_reason or 'stop'))}\n\n"
                    yield "data: [DONE]\n\n"
                    done = True
                finally:
                    if not done:
                        req.cancelled = True  # the client went away: free the row

            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            while await out.get() is not None:
                pass
        except asyncio.CancelledError:
            req.cancelled = True
            raise
        tokens = req.tokens if req.ignore_eos else [t for t in req.tokens if t != service.engine.eos]
        text = service.tok.decode(tokens, skip_special_tokens=True)
        choice = {"index": 0, "finish_reason": req.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": rid, "object": kind, "created": created, "model": meta["model"], "choices": [choice],
                "usage": {"prompt_tokens": len(req.prompt), "completion_tokens": len(tokens),
                          "total_tokens": len(req.prompt) + len(tokens)}}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await run(request, chat=True)

    return app


def check_bind(host: str, api_key: str | None) -> None:
    """Only the loopback address serves without an API key."""
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        p = Problems("refusing to serve without an API key")
        p.add(f"host={host!r}", "a server on an address other than the loopback is reachable by others",
              "pass --api_key KEY (clients send Authorization: Bearer KEY), or bind 127.0.0.1")
        p.raise_if_any()
