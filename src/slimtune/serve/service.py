"""What the HTTP endpoints do, apart from HTTP: a request's rows, their choices, the answer.

    job = service.job(CompletionRequest(...), chat=False)   # one engine Request per prompt and choice
    out = service.submit(job, loop)                          # (row, token or None) arrive on `out`
    text = job.feed(row, token)                              # what a stream may send now
    job.answer()                                             # OpenAI's completion object

Also registering and dropping adapters (on the engine's thread, where the model may change),
/health and /metrics.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..data.templates import gist_prompt
from ..errors import Problems, SlimtuneError
from .engine import Engine, QueueFull, Request
from .guard import Access
from .pool import AdapterPool, Conflict, check_name
from .protocol import ApiError, Bounds, ChatCompletionRequest, SamplingRequest
from .text import Choice


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 2048
    max_tokens: int = 512


@dataclass
class Job:
    """One HTTP request's rows (one per prompt and choice, in OpenAI's order) and their choices."""

    requests: list[Request]
    choices: list[Choice]
    prompt_tokens: int
    chat: bool
    model: str
    stream: bool = False
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def feed(self, i: int, token: int | None) -> str:
        """Row i's next token (None: the row ended); the text its choice may release now. A
        complete stop string ends the choice and frees its row."""
        c, r = self.choices[i], self.requests[i]
        if c.finish_reason is not None:
            return ""
        if token is None:
            if r.finish_reason == "error":
                raise ApiError(500, r.error or "generation failed", code="generation_failed", kind="server_error")
            return c.finish(r.finish_reason or "stop")
        c.add(token)
        if c.stopped:
            r.cancelled = True
            return c.finish("stop")
        return c.release() if self.stream else ""

    def cancel(self) -> None:
        for r in self.requests:
            r.cancelled = True  # finished rows ignore it; running and waiting ones leave

    def usage(self) -> dict:
        completion = sum(len(c.ids) for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def logprobs(self, i: int):
        return self.choices[i].logprobs(self.requests[i].steps, self.chat)

    def chunk(self, i: int, text: str, finish: str | None, role: bool = False) -> dict:
        """One server-sent event's object for choice i."""
        choice = {"index": i, "logprobs": self.logprobs(i) if not role else None, "finish_reason": finish}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": ""} if role else {"content": text} if text else {}
        else:
            choice["text"] = text
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def answer(self) -> dict:
        choices = []
        for i, c in enumerate(self.choices):
            choice = {"index": i, "logprobs": self.logprobs(i), "finish_reason": c.finish_reason}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = c.text
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}


class Service:
    """What the endpoints do, apart from HTTP: turn requests into rows, submit, register adapters."""

    def __init__(self, engine: Engine, pool: AdapterPool, base_name: str, limits: Limits,
                 access: Access | None = None, adapter_dirs: list[str] = ()):
        self.engine, self.pool, self.base_name, self.limits = engine, pool, base_name, limits
        self.access = access or Access()
        self.adapter_dirs = [Path(os.path.realpath(d)) for d in adapter_dirs]
        self.tok = engine.tok
        emb = engine.model.get_input_embeddings().weight.shape[0]
        out = engine.model.get_output_embeddings()
        self.vocab = min(emb, out.weight.shape[0]) if out is not None else emb  # valid token ids
        self.rejected = 0

    def models(self) -> list[str]:
        return [self.base_name] + self.pool.models()

    def bounds(self) -> Bounds:
        return Bounds(self.vocab, self.limits.max_tokens)

    def resolve(self, model: str) -> tuple[str | None, object]:
        """(adapter name or None, gist cache or None) for a request's `model`."""
        if model in (self.base_name, "base"):
            return None, None
        if model in self.pool.gists:
            adapter, cache = self.pool.gists[model]
            return adapter, cache
        if model in self.pool.known:
            return model, None
        raise ApiError(404, f"model {model[:100]!r} does not exist; available: {self.models()}", "model",
                       "model_not_found")

    # ---- completions ------------------------------------------------------------------------
    def job(self, body: SamplingRequest, chat: bool) -> Job:
        """The request's rows, every bound checked."""
        adapter, gist = self.resolve(body.model)
        prompts = [self._chat_ids(body, gist)] if chat else [self._prompt_ids(p, gist) for p in body.prompt]
        where = "messages" if chat else "prompt"
        for ids in prompts:
            if not ids:
                raise ApiError(400, "the prompt is empty", where)
            if len(ids) > self.limits.max_prompt_tokens:
                raise ApiError(400, f"the prompt has {len(ids)} tokens, more than this server's "
                               f"{self.limits.max_prompt_tokens}", where, "context_length_exceeded")
        n = body.n or 1
        if len(prompts) * n > max(self.engine.max_queue, 1):
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={n} is {len(prompts) * n} rows, more than this server "
                           f"queues (--max_queue {self.engine.max_queue})", "n")
        sampling = self._sampling(body, chat)
        reqs = [Request(list(ids), adapter, gist, seed=None if body.seed is None else body.seed + k * n + j, **sampling)
                for k, ids in enumerate(prompts) for j in range(n)]  # a seed per choice: sampled choices differ
        live = bool(body.stream)
        return Job(reqs, [Choice(self.tok, body.stop, live) for _ in reqs], sum(len(p) for p in prompts), chat,
                   body.model, live, bool(body.stream_options and body.stream_options.include_usage),
                   ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24])

    def _sampling(self, body: SamplingRequest, chat: bool) -> dict:
        """The engine's Request fields for the body's sampling fields, their defaults OpenAI's."""
        if chat:
            max_tokens = body.max_completion_tokens or body.max_tokens or self.limits.max_tokens
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        else:
            max_tokens = body.max_tokens or min(16, self.limits.max_tokens)
            logprobs = body.logprobs
        return dict(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p, ignore_eos=bool(body.ignore_eos),
                    presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                    logit_bias=body.logit_bias or None, logprobs=logprobs)

    def _prompt_ids(self, prompt: str | list[int], gist) -> list[int]:
        if isinstance(prompt, list):
            return prompt  # token ids, taken as they are (after the gists, for a gist cache)
        return self._input_ids(prompt) if gist is not None else self.tok(prompt)["input_ids"]

    def _chat_ids(self, body: ChatCompletionRequest, gist) -> list[int]:
        if gist is not None:
            users = [m.content or "" for m in body.messages if m.role == "user"]
            return self._input_ids(users[-1] if users else "")
        if not getattr(self.tok, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions", "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content or "",
                     **({"name": m.name} if m.name else {})} for m in body.messages]
        try:
            return list(self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])
        except Exception as e:  # the template's own checks (raise_exception: roles must alternate, ...)
            raise ApiError(400, f"the model's chat template refused these messages: {type(e).__name__}: {e}",
                           "messages") from None

    def _input_ids(self, text: str) -> list[int]:
        """The input part of the gist template, after the cached gists."""
        return self.tok(gist_prompt("", text, 1)[1], add_special_tokens=False)["input_ids"]

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        """Queue every row of the job, or none: (row index, token or None) arrive on the queue."""
        out: asyncio.Queue = asyncio.Queue()
        if self.engine.waiting.qsize() + len(job.requests) > self.engine.max_queue:
            self.rejected += 1
            raise ApiError(429, f"the server is busy ({self.engine.waiting.qsize()} requests are waiting already); "
                           "retry later", code="rate_limit_exceeded", kind="rate_limit_error")
        for i, req in enumerate(job.requests):
            req.emit = lambda t, i=i: loop.call_soon_threadsafe(out.put_nowait, (i, t))
            try:
                self.engine.submit(req)
            except QueueFull as e:
                job.cancel()
                self.rejected += 1
                raise ApiError(429, f"the server is busy ({e}); retry later", code="rate_limit_exceeded",
                               kind="rate_limit_error") from None
        return out

    # ---- adapters ---------------------------------------------------------------------------
    async def on_engine(self, fn):
        """fn() on the engine's thread, between two decoding steps (where the model may change)."""
        thread = self.engine._thread
        if thread is None or not thread.is_alive():
            raise ApiError(503, "the generation loop is not running", kind="server_error")
        done: concurrent.futures.Future = concurrent.futures.Future()

        def op():
            try:
                done.set_result(fn())
            except BaseException as e:  # never out of the op: the loop would fail its running rows
                done.set_exception(e)

        self.engine.call_later(op)
        return await asyncio.wrap_future(done)

    async def register(self, name: str, path: str) -> bool:
        """Register adapter `name` from `path` (under one of the adapter directories): True if
        new, False if it was registered from there already."""
        p = Problems("cannot register the adapter")
        check_name(p, name)
        if p.items:
            raise ApiError(400, str(SlimtuneError(p.items, p.context)), "name")
        if not self.adapter_dirs:
            raise ApiError(403, "this server registers no adapters at run time: start it with --adapter_dir DIR "
                           "to allow adapters from under DIR", "path", "adapter_dir_not_allowed", "permission_error")
        try:
            real = Path(os.path.realpath(path))
        except (ValueError, OSError) as e:
            raise ApiError(400, f"'path' is not a usable path ({e})", "path") from None
        if not any(real.is_relative_to(d) for d in self.adapter_dirs):
            raise ApiError(403, f"{path[:200]!r} is not under the directories this server loads adapters from "
                           "(--adapter_dir; symbolic links are resolved)", "path", "adapter_dir_not_allowed",
                           "permission_error")
        try:
            return await self.on_engine(lambda: self.pool.register(name, str(real)))
        except Conflict as e:
            raise ApiError(409, str(e), "name", "adapter_exists") from None
        except SlimtuneError as e:
            raise ApiError(400, str(e), "path", "adapter_invalid") from None

    def unregister(self, name: str) -> None:
        if name not in self.pool.known:
            raise ApiError(404, f"adapter {name[:100]!r} is not known", "name", "model_not_found")
        self.pool.known.pop(name)
        for key in [k for k, (a, _) in self.pool.gists.items() if a == name]:
            self.pool.gists.pop(key)

        def unload():  # on the engine's thread, once no running row uses it
            if name in self.engine.in_use():
                self.engine.call_later(unload)
            else:
                self.pool.unload(name)

        self.engine.call_later(unload)

    # ---- what runs --------------------------------------------------------------------------
    def health(self, authorized: bool) -> tuple[dict, int]:
        """{"status"}; to a client with the key (or with none set), what runs too."""
        ok = self.engine._thread is not None and self.engine._thread.is_alive()
        body = {"status": "ok" if ok else "down"}
        if authorized:
            body.update(running=self.engine.running, queued=self.engine.waiting.qsize(),
                        adapters_loaded=list(self.pool.loaded))
        return body, 200 if ok else 503

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
        lines += [f'slimtune_adapter_requests_total{{adapter="{label(a)}"}} {n}'
                  for a, n in sorted(e.adapter_requests.items())]
        return "\n".join(lines) + "\n"


def label(value: str) -> str:
    """A Prometheus label value, escaped (names are checked when registered; this is the second wall)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
