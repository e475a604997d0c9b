"""The OpenAI-compatible HTTP API over the engine (FastAPI; `slimtune serve` runs it with uvicorn).

    GET  /v1/models                 the base, every known adapter, every adapter:gist pair
    POST /v1/completions            prompt(s) -> text (stream: server-sent events)
    POST /v1/chat/completions       messages -> the tokenizer's chat template -> text
    GET  /health                    ok (and, to a client with the key, what runs)
    GET  /metrics                   Prometheus text: requests, tokens, tokens/s, queue, rows, adapters
    POST /v1/adapters               {"name", "path"}: register an adapter from under --adapter_dir
    DELETE /v1/adapters/{name}      unload it

`model` selects the base (its name, or "base"), an adapter, or "adapter:gist", a saved gist
cache standing in for the instruction (the system prompt): the request's prompt, or the
conversation's last user message, is then the input after the gists.

Thin routes over typed request models (protocol.py) and a Service that does the work
(service.py): it turns a request into engine rows (one per prompt and choice), feeds their
tokens to their `Choice`s (text.py: stop strings, what a stream may release) and answers in
OpenAI's shape. Every request passes the Guard first (guard.py: Host, Origin, key,
Content-Type, size). Every error, the framework's 404 and 405 included, is in OpenAI's
shape, {"error": {"message", "type", "param", "code"}}. A client that goes away frees its
rows: a stream's at once, a plain request's within DISCONNECT_POLL_S. (No `from __future__
import annotations` here: FastAPI reads the handlers' annotations at run time.)
"""

import asyncio
import json
import time

from ..errors import Problems
from .guard import Guard
from .protocol import AdapterRequest, ApiError, ChatCompletionRequest, CompletionRequest, parse_body, validation_error
from .service import Job, Service

DISCONNECT_POLL_S = 0.25  # how often a plain (not streaming) request checks that its client is still there


def sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def build_app(service: Service):
    """The FastAPI application over a Service."""
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="slimtune", docs_url=None, redoc_url=None, openapi_url=None)
    limits, access = service.limits, service.access
    if access.allowed_origins:  # answers the browsers' preflights for the allowed pages
        app.add_middleware(CORSMiddleware, allow_origins=access.allowed_origins,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, access=access)  # added last: runs first

    def error(e: ApiError, headers: dict | None = None):
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return error(e)

    @app.exception_handler(404)
    @app.exception_handler(405)
    async def http_error(request: HttpRequest, e):  # the router's (its HTTPException, or the framework's default)
        status = getattr(e, "status_code", 404)
        message = (f"no route {request.url.path[:200]!r}" if status == 404
                   else f"{request.method} is not allowed on {request.url.path[:200]!r}")
        return error(ApiError(status, message, code="not_found" if status == 404 else "method_not_allowed"),
                     getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        return error(validation_error(list(e.errors())))

    @app.exception_handler(Exception)
    async def unexpected(_, e: Exception):  # never a bare 500 page: the error in OpenAI's shape
        return error(ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))

    async def read_body(request: HttpRequest) -> bytes:
        """The body, refused (413) as soon as it passes the bound, whether or not it said its length."""
        chunks, size = [], 0
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "the client went away before the body was complete")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limits.max_body_bytes:
                raise ApiError(413, f"the body is larger than {limits.max_body_bytes} bytes (--max_body_bytes)")
            if not message.get("more_body"):
                return b"".join(chunks)

    @app.get("/health")
    async def health(request: HttpRequest):
        body, status = service.health(access.authorized(dict(request.headers)))
        return JSONResponse(body, status_code=status)

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
        body = parse_body(await read_body(request), AdapterRequest)
        created = await service.register(body.name, body.path)
        return {"loaded": body.name, "changed": created}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        service.unregister(name)
        return {"unloaded": name}

    async def collect(job: Job, out: asyncio.Queue, request: HttpRequest) -> bool:
        """Feed the rows' tokens to the choices until all are done; False if the client left
        first (checked every DISCONNECT_POLL_S, whether or not tokens are coming)."""
        async def feed():
            while not job.done:
                job.feed(*await out.get())

        task = asyncio.ensure_future(feed())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await request.is_disconnected():
                    return False
            task.result()  # its ApiError, if a row failed
            return True
        finally:
            task.cancel()

    async def events(job: Job, out: asyncio.Queue):
        """The server-sent events of a stream: its chunks, usage if asked, [DONE]."""
        try:
            if job.chat:
                for i in range(len(job.choices)):
                    yield sse(job.chunk(i, "", None, role=True))
            while not job.done:
                i, token = await out.get()
                try:
                    text = job.feed(i, token)
                except ApiError as e:
                    yield sse(e.body())
                    break
                finish = job.choices[i].finish_reason
                if text:
                    yield sse(job.chunk(i, text, None))
                if finish is not None:
                    yield sse(job.chunk(i, "", finish))
            else:
                if job.include_usage:
                    yield sse({"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
                               "created": job.created, "model": job.model, "choices": [], "usage": job.usage()})
            yield sse("[DONE]")
        finally:
            job.cancel()  # done, or the client went away: free the rows

    async def run(request: HttpRequest, chat: bool):
        body = parse_body(await read_body(request), ChatCompletionRequest if chat else CompletionRequest,
                          service.bounds())
        job = service.job(body, chat)
        out = service.submit(job, asyncio.get_running_loop())
        if job.stream:
            return StreamingResponse(events(job, out), media_type="text/event-stream")
        try:
            if not await collect(job, out, request):
                return JSONResponse(None, status_code=499)  # nobody is there to read it
        finally:
            job.cancel()
        return job.answer()

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
