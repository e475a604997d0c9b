"""One generation loop shared by every request: continuous batching with a per-row adapter.

Requests wait in a bounded queue. Between two decoding steps the loop admits waiting requests
(up to `max_batch` rows), prefills them together (each row with its own adapter, a mixed batch:
adapters/inject.adapter_rows) and merges their keys and values into the running batch's
cache; then every running row decodes one token in one forward, each with its adapter.
Finished rows (EOS, max_tokens) and rows whose client went away leave the batch at once.
Each row's logits may be adjusted before it picks its token (OpenAI's presence and frequency
penalties, a logit bias), and may report the model's log-probabilities.

Why a loop of our own: transformers' continuous-batching engine (generate_batch and its paged
cache) schedules tokens itself and gives no hook to say which adapter each row's tokens go
through, so this is a lean loop over a transformers `DynamicCache`, rebuilt (a left-padded
concatenation of the rows' keys and values) only when rows join, and cut down by index when
they leave. A row with a gist cache starts with the gists' keys and values instead of its
instruction (eval/gist_cache.py).
"""

from __future__ import annotations

import inspect
import queue
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..adapters.inject import adapter_rows
from ..eval.generation import _cache_kw, _pick
from ..eval.gist_cache import GistCache, batch_after_gists


class QueueFull(Exception):
    """The waiting queue is at its bound: the request is refused (HTTP 429)."""


@dataclass
class Request:
    """One completion: its prompt tokens, adapter, sampling, and where its tokens go."""

    prompt: list[int]
    adapter: str | None = None
    gist: GistCache | None = None
    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # generate max_tokens tokens whatever comes (benchmarks; vLLM's extension)
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: times the number of times each was generated
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    logprobs: int | None = None  # report each token's log-probability and the k most likely (None: no)
    emit: object = None  # callable(token id or None at the end); called from the loop's thread
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    steps: list | None = None  # with logprobs: per token, (its log-probability, [(id, log-probability)] * k)
    finish_reason: str | None = None
    error: str | None = None  # why it finished with "error"
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    generator: torch.Generator | None = None


@dataclass
class Rows:
    """The running batch: its cache (B rows, L positions), mask (B, L), next positions (B,)."""

    requests: list[Request]
    cache: DynamicCache
    mask: torch.Tensor
    pos: torch.Tensor
    logits: torch.Tensor  # (B, V) the next token's logits


def _logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of `token` and the k most likely tokens', from (V,) logits
    (before penalties, bias, temperature and top_p, as vLLM reports by default)."""
    lp = torch.log_softmax(logits.float(), -1)
    top = lp.topk(k) if k else None
    return float(lp[token]), [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [n, 0]
    return F.pad(t, pad)


class Engine:
    """The loop: `submit` from any thread; `start` runs it in a thread of its own."""

    def __init__(self, model, tokenizer, ensure_adapter=None, max_batch: int = 32, max_queue: int = 64,
                 eos_token_id: int | None = None):
        self.model, self.tok = model, tokenizer
        self.ensure_adapter = ensure_adapter or (lambda name, in_use: None)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.rows: Rows | None = None
        self.stats = Counter()  # requests, tokens, per-adapter requests
        self.adapter_requests: Counter = Counter()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.device = next(model.parameters()).device
        self.kw = _cache_kw(model)
        # prefill needs the last position's logits only: the LM head over the whole prompt is
        # most of the vocabulary-sized work (transformers' `logits_to_keep`)
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters \
            else {}
        self.recent: list[tuple[float, int]] = []  # (time, tokens) of recent steps, for tokens/s
        self.error: BaseException | None = None
        self.ops: queue.Queue = queue.Queue()  # changes to the model, run between two steps

    # ---- the outside ------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        if self.waiting.qsize() >= self.max_queue:
            raise QueueFull(f"{self.waiting.qsize()} requests are waiting already")
        if req.seed is not None:
            req.generator = torch.Generator().manual_seed(req.seed)
        if req.logprobs is not None:
            req.steps = []
        self.stats["requests"] += 1
        self.adapter_requests[req.adapter or "base"] += 1
        self.waiting.put(req)
        self._wake.set()

    def call_later(self, fn) -> None:
        """Run fn() on the loop's thread before its next step (adapters loaded or unloaded)."""
        self.ops.put(fn)
        self._wake.set()

    def in_use(self) -> set:
        return {r.adapter for r in (self.rows.requests if self.rows is not None else [])}

    @property
    def running(self) -> int:
        return 0 if self.rows is None else len(self.rows.requests)

    def tokens_per_s(self, window: float = 10.0) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in self.recent if now - t <= window]
        if len(recent) < 2:
            return 0.0
        return sum(n for _, n in recent[1:]) / max(1e-9, recent[-1][0] - recent[0][0])

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="slimtune-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.step():
                    self._wake.wait(0.05)
                    self._wake.clear()
            except Exception as e:  # a failed step ends its rows with an error, not the server
                self.error = e
                print(f"slimtune serve: a generation step failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                for r in (self.rows.requests if self.rows is not None else []):
                    self._finish(r, "error", f"a generation step failed: {type(e).__name__}: {e}")
                self.rows = None

    @torch.no_grad()
    def step(self) -> bool:
        """Admit, prefill, decode one token for every running row. False when idle."""
        for _ in range(self.ops.qsize()):  # those queued now (an op may queue itself again)
            self.ops.get_nowait()()
        self._drop_cancelled()
        self._admit()
        if self.rows is None:
            return False
        rows = self.rows
        tok = self._sample(rows)
        now = time.perf_counter()
        keep = []
        for i, (r, t) in enumerate(zip(rows.requests, tok.tolist())):
            if r.cancelled:
                self._finish(r, "cancelled")
                continue
            r.tokens.append(t)
            if r.first_token is None:
                r.first_token = now
            if t == self.eos and not r.ignore_eos:
                self._finish(r, "stop")
                continue
            r.emit(t)
            if len(r.tokens) >= r.max_tokens:
                self._finish(r, "length")
                continue
            keep.append(i)
        self.stats["tokens"] += len(rows.requests)
        self.recent = self.recent[-200:] + [(now, len(rows.requests))]
        if not keep:
            self.rows = None
            return True
        self._select(keep)
        rows = self.rows
        rows.mask = torch.cat([rows.mask, rows.mask.new_ones(len(keep), 1)], 1)
        x = tok[torch.tensor(keep, device=tok.device)][:, None]
        names = [r.adapter for r in rows.requests]
        with adapter_rows(self.model, names):
            out = self.model(input_ids=x, attention_mask=rows.mask, position_ids=rows.pos[:, None], use_cache=True,
                             **{self.kw: rows.cache})
        rows.logits = out.logits[:, -1].float()
        rows.pos = rows.pos + 1
        return True

    def _sample(self, rows: Rows) -> torch.Tensor:
        logits = self._adjusted(rows)
        out = logits.argmax(-1)
        for i, r in enumerate(rows.requests):
            if r.temperature > 0:
                out[i] = _pick(logits[i:i + 1], True, r.temperature, r.top_p, r.generator)[0]
            if r.logprobs is not None:
                r.steps.append(_logprobs(rows.logits[i], int(out[i]), r.logprobs))
        return out

    def _adjusted(self, rows: Rows) -> torch.Tensor:
        """The logits the rows pick from: OpenAI's penalties on the counts of the tokens each row
        generated so far, `logit[j] -= frequency * count[j] + presence * (count[j] > 0)`, then
        the row's logit bias. The model's own logits when no row asks for either."""
        asks = [i for i, r in enumerate(rows.requests)
                if r.presence_penalty or r.frequency_penalty or r.logit_bias]
        if not asks:
            return rows.logits
        logits = rows.logits.clone()
        V = logits.shape[-1]
        for i in asks:
            r = rows.requests[i]
            if r.tokens and (r.presence_penalty or r.frequency_penalty):
                count = torch.bincount(torch.tensor(r.tokens, device=logits.device), minlength=V)[:V].float()
                logits[i] -= r.frequency_penalty * count + r.presence_penalty * (count > 0).float()
            if r.logit_bias:
                ids = torch.tensor(list(r.logit_bias), device=logits.device)
                logits[i, ids] += torch.tensor(list(r.logit_bias.values()), device=logits.device)
        return logits

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        r.finish_reason, r.error = reason, error
        r.emit(None)

    def _drop_cancelled(self) -> None:
        if self.rows is not None and any(r.cancelled for r in self.rows.requests):
            keep = [i for i, r in enumerate(self.rows.requests) if not r.cancelled]
            for r in self.rows.requests:
                if r.cancelled:
                    self._finish(r, "cancelled")
            if keep:
                self._select(keep)
            else:
                self.rows = None

    def _select(self, keep: list[int]) -> None:
        rows = self.rows
        idx = torch.tensor(keep, device=self.device)
        for layer in rows.cache.layers:
            layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        rows.requests = [rows.requests[i] for i in keep]
        rows.mask, rows.pos, rows.logits = rows.mask[idx], rows.pos[idx], rows.logits[idx]
        lead = int((rows.mask.sum(0) == 0).long().cumprod(0).sum())  # columns no row uses any more
        if lead:
            rows.mask = rows.mask[:, lead:]
            for layer in rows.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]

    def _admit(self) -> None:
        new: list[Request] = []
        in_use = {r.adapter for r in (self.rows.requests if self.rows else [])}
        deferred = []
        while self.running + len(new) < self.max_batch:
            try:
                r = self.waiting.get_nowait()
            except queue.Empty:
                break
            if r.cancelled:
                self._finish(r, "cancelled")
                continue
            try:
                ok = True if r.adapter is None else self.ensure_adapter(r.adapter, in_use | {x.adapter for x in new})
            except Exception as e:  # its adapter failed to load: this request fails, no other
                self._finish(r, "error", f"adapter {r.adapter!r} failed to load: {e}")
                continue
            if ok is None:  # the adapter was dropped while the request waited
                self._finish(r, "error", f"adapter {r.adapter!r} was unloaded while the request waited")
                continue
            if not ok:
                deferred.append(r)  # every adapter slot is in use: wait for one to free
                continue
            new.append(r)
        for r in deferred:
            self.waiting.put(r)
        if not new:
            return
        self._merge(self._prefill(new))

    def _prefill(self, reqs: list[Request]) -> Rows:
        """The new rows' prompts through the model, left-padded, each with its adapter (rows
        with a gist cache start from its keys and values)."""
        kw = batch_after_gists(self.model, [r.gist for r in reqs], [r.prompt for r in reqs], self.pad)
        ids, mask, cache = kw["input_ids"], kw["attention_mask"], kw[self.kw]
        P = cache.get_seq_length()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with adapter_rows(self.model, [r.adapter for r in reqs]):
            out = self.model(input_ids=ids[:, P:], attention_mask=mask, position_ids=pos[:, P:], use_cache=True,
                             **{self.kw: cache}, **self.last_only)
        return Rows(list(reqs), cache, mask, pos[:, -1] + 1, out.logits[:, -1].float())

    def _merge(self, new: Rows) -> None:
        if self.rows is None:
            self.rows = new
            return
        old = self.rows
        L = max(old.mask.shape[1], new.mask.shape[1])
        layers = []
        for (ko, vo), (kn, vn) in zip(_layers(old.cache), _layers(new.cache)):
            layers.append((torch.cat([_left_pad(ko, L - ko.shape[2], 2), _left_pad(kn, L - kn.shape[2], 2)]),
                           torch.cat([_left_pad(vo, L - vo.shape[2], 2), _left_pad(vn, L - vn.shape[2], 2)])))
        mask = torch.cat([_left_pad(old.mask, L - old.mask.shape[1], 1), _left_pad(new.mask, L - new.mask.shape[1], 1)])
        self.rows = Rows(old.requests + new.requests, DynamicCache(ddp_cache_data=layers, config=self.model.config),
                         mask, torch.cat([old.pos, new.pos]), torch.cat([old.logits, new.logits]))
