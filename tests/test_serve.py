"""The server, for real: uvicorn on 127.0.0.1, driven by the `openai` client and by raw HTTP.
Every answer is checked against the same request run alone (greedy) by transformers' own
`generate` on a separate copy of the model with that one adapter."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import http.client
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import slimtune
from slimtune.serve.config import ServeConfig
from slimtune.serve.engine import Request
from slimtune.serve.server import Server

openai = pytest.importorskip("openai")

METHODS8 = ["lora", "lora", "vera", "vera", "ia3", "tied-lora", "lora", "ia3"]
PROMPTS = ["Sort the numbers: 3, 1, 2", "Convert 3 kilograms to grams", "Add 2 and 5", "Spell cat backwards",
           "Name a colour", "Count to three", "What is 7 times 6?", "Say hello"]


def save_perturbed(tiny_dir, method: str, directory, g: torch.Generator) -> str:
    """A saved adapter over the tiny model, every tensor moved off its initial value."""
    cfg = slimtune.preset(method, **({"r": 16} if method == "vera" else {}))
    model = slimtune.add_adapter(slimtune.load_model(tiny_dir), cfg)
    with torch.no_grad():
        for t in slimtune.trainable_parameters(model).values():
            t.copy_(t + 0.3 * torch.randn(t.shape, generator=g) if t.dim() == 1
                    else 0.1 * torch.randn(t.shape, generator=g))
    slimtune.save_adapter(model, directory)
    return str(directory)


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    """Eight saved adapters over the tiny model (perturbed: nothing at identity), and a gist
    adapter with a saved cache."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    g = torch.Generator().manual_seed(0)
    for i, m in enumerate(METHODS8):
        out[f"a{i}"] = save_perturbed(tiny_dir, m, root / f"a{i}", g)
    model, tok = slimtune.load_model(tiny_dir), slimtune.load_tokenizer(tiny_dir)
    slimtune.add_adapter(model, slimtune.preset("lora"))
    slimtune.add_gist_tokens(model, slimtune.GistTokens(slimtune.add_gist_token(tok), 1))
    with torch.no_grad():
        for t in slimtune.trainable_parameters(model).values():
            t.copy_(0.1 * torch.randn(t.shape, generator=g))
    slimtune.save_adapter(model, root / "g")
    out["g"] = str(root / "g")
    slimtune.save_gist_cache(slimtune.compress_gist(model.eval(), tok, "Answer in one word."), root / "g.safetensors")
    out["g:one"] = str(root / "g.safetensors")
    return out


@pytest.fixture(scope="module")
def server(tiny_dir, adapters):
    cfg = ServeConfig(model=tiny_dir, adapter=[f"{k}={v}" for k, v in adapters.items() if ":" not in k],
                      gist=[f"g:one={adapters['g:one']}"], adapter_dir=[str(Path(adapters["a0"]).parent)], port=0,
                      max_loaded=9, max_batch=16, max_queue=128,
                      max_prompt_tokens=512, max_tokens=256, max_body_bytes=4096)
    s = Server.start(cfg)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


_refs: dict = {}


@torch.no_grad()
def alone(tiny_dir, adapters, adapter: str | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The request alone: transformers' generate, greedy, on a model with that adapter only."""
    key = adapter
    if key not in _refs:
        model, tok = slimtune.load_model(tiny_dir).eval(), slimtune.load_tokenizer(tiny_dir)
        if adapter is not None:
            slimtune.load_adapter(model, adapters[adapter], tokenizer=tok)
        _refs[key] = (model, tok)
    model, tok = _refs[key]
    x = torch.tensor([prompt_ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, top_k=None, top_p=None,
                         temperature=None)[0, x.shape[1]:].tolist()
    return out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out


def expected_text(tiny_dir, adapters, adapter, prompt, max_tokens=8):
    tok = slimtune.load_tokenizer(tiny_dir)
    return tok.decode(alone(tiny_dir, adapters, adapter, tok(prompt)["input_ids"], max_tokens), skip_special_tokens=True)


def test_models_lists_the_base_the_adapters_and_the_gist_caches(client, adapters):
    ids = {m.id for m in client.models.list().data}
    assert {"a0", "a7", "g", "g:one"} <= ids and len(ids) == len(adapters) + 1


def test_completion_chat_and_streaming_equal_the_request_alone(client, tiny_dir, adapters):
    want = expected_text(tiny_dir, adapters, "a2", PROMPTS[0])
    got = client.completions.create(model="a2", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert got.choices[0].text == want and got.usage.prompt_tokens > 0
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="a2", prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True))
    assert streamed == want
    tok = slimtune.load_tokenizer(tiny_dir)
    msgs = [{"role": "user", "content": PROMPTS[1]}]
    ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    want = tok.decode(alone(tiny_dir, adapters, "a4", ids, 8), skip_special_tokens=True)
    chat = client.chat.completions.create(model="a4", messages=msgs, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == want
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="a4", messages=msgs, max_tokens=8, temperature=0, stream=True)]
    assert "".join(parts) == want
    base = client.completions.create(model="base", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
    assert base == expected_text(tiny_dir, adapters, None, PROMPTS[0])
    assert base != client.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text


def test_a_gist_cache_stands_in_for_the_instruction(client, tiny_dir, adapters):
    model, tok = slimtune.load_model(tiny_dir).eval(), slimtune.load_tokenizer(tiny_dir)
    slimtune.load_adapter(model, adapters["g"], tokenizer=tok)
    cache = slimtune.load_gist_cache(adapters["g:one"])
    want = slimtune.answer_with_gists(model, tok, [cache], ["the sky"], max_new_tokens=8)[0]
    got = client.completions.create(model="g:one", prompt="the sky", max_tokens=8, temperature=0).choices[0].text
    assert got.strip() == want
    chat = client.chat.completions.create(model="g:one", messages=[{"role": "user", "content": "the sky"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.content.strip() == want


def test_64_concurrent_requests_across_8_adapters_each_equal_alone(client, tiny_dir, adapters, server):
    jobs = [(f"a{i % 8}", PROMPTS[(i * 3) % 8]) for i in range(64)]
    with cf.ThreadPoolExecutor(64) as ex:
        answers = list(ex.map(lambda j: client.completions.create(model=j[0], prompt=j[1], max_tokens=8,
                                                                  temperature=0).choices[0].text, jobs))
    for (adapter, prompt), got in zip(jobs, answers):
        assert got == expected_text(tiny_dir, adapters, adapter, prompt), (adapter, prompt)
    assert server.service.engine.running == 0


def raw(server, path: str, body: bytes | str | None = None, method: str = "POST", headers: dict | None = None):
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


BAD = [
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", "[1, 2]", 400, None),
    ("/v1/completions", json.dumps({"prompt": "x"}), 400, "model"),
    ("/v1/completions", json.dumps({"model": "nope", "prompt": "x"}), 404, "model"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": 5}), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": ""}), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": "x", "max_tokens": 10_000}), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": "x", "max_tokens": "ten"}), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": "x", "max_tokens": 0}), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": "x", "temperature": -1}), 400, "temperature"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": "x", "top_p": 0}), 400, "top_p"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": "x", "n": 9}), 400, "n"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": "x", "stream": "yes"}), 400, "stream"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": "word " * 700}), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": "x" * 5000}), 413, None),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), 400, "stop"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": "x", "stop": ""}), 400, "stop"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": [1, 10**6]}), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": ["x"] * 33}), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": "x", "logprobs": 6}), 400, "logprobs"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": "x", "presence_penalty": 2.5}), 400, "presence_penalty"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": "x", "frequency_penalty": -3}), 400, "frequency_penalty"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": "x", "logit_bias": {"1": 101}}), 400, "logit_bias"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": "x", "logit_bias": {"99999": 1}}), 400, "logit_bias"),
    ("/v1/completions", json.dumps({"model": "a0", "prompt": "x", "stream_options": {"include_usage": True}}), 400,
     "stream_options"),
    ("/v1/chat/completions", json.dumps({"model": "a0", "messages": [{"role": "user", "content": "x"}],
                                         "top_logprobs": 2}), 400, "top_logprobs"),
    ("/v1/chat/completions", json.dumps({"model": "a0", "messages": [{"role": "user", "content": "x"}],
                                         "logprobs": True, "top_logprobs": 21}), 400, "top_logprobs"),
    ("/v1/chat/completions", json.dumps({"model": "a0", "messages": [{"role": "tool", "content": "x"}]}), 400,
     "messages"),
    ("/v1/chat/completions", json.dumps({"model": "a0", "messages": "hi"}), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"model": "a0", "messages": []}), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"model": "a0", "messages": [{"content": "hi"}]}), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"model": "a0", "messages": [{"role": "user", "content": 3}]}), 400,
     "messages"),
]


@pytest.mark.parametrize("path, body, status, param", BAD)
def test_malformed_requests_get_a_4xx_in_openai_shape(server, path, body, status, param):
    code, reply = raw(server, path, body)
    assert code == status
    err = reply["error"]
    assert err["message"] and err["type"] and err["param"] == param


def test_adapters_load_and_unload_at_run_time(server, client, tiny_dir, adapters):
    assert raw(server, "/v1/adapters", json.dumps({"name": "late", "path": adapters["a3"]}))[0] == 200
    got = client.completions.create(model="late", prompt=PROMPTS[2], max_tokens=8, temperature=0).choices[0].text
    assert got == expected_text(tiny_dir, adapters, "a3", PROMPTS[2])
    assert raw(server, "/v1/adapters/late", None, method="DELETE")[0] == 200
    assert raw(server, "/v1/completions", json.dumps({"model": "late", "prompt": "x"}))[0] == 404
    deadline = time.time() + 10
    while "late" in server.service.pool.loaded and time.time() < deadline:
        time.sleep(0.05)
    assert "late" not in slimtune.adapter_names(server.service.engine.model)
    missing = str(Path(adapters["a0"]).parent / "missing")
    assert raw(server, "/v1/adapters", json.dumps({"name": "x", "path": missing}))[0] == 400
    assert raw(server, "/v1/adapters", json.dumps({"name": "x", "path": "/nonexistent"}))[0] == 403  # not under


def test_unknown_routes_and_methods_are_4xx(server):
    assert raw(server, "/v1/nothing", "{}")[0] == 404
    assert raw(server, "/v1/completions", None, method="GET")[0] == 405


def test_a_client_dropped_mid_stream_frees_its_row(server, client):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    body = json.dumps({"model": "a1", "prompt": "Count to three", "max_tokens": 32, "temperature": 0.7,
                       "stream": True, "seed": 1})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.readline()  # the first event
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.time() + 20
    while server.service.engine.running and time.time() < deadline:
        time.sleep(0.05)
    assert server.service.engine.running == 0
    assert client.completions.create(model="a1", prompt="Say hello", max_tokens=2, temperature=0).choices[0].text \
        is not None


def test_500_requests_leave_the_server_healthy_with_nothing_left_behind(server, client):
    gc.collect()
    before = sum(isinstance(o, Request) for o in gc.get_objects())
    with cf.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda i: client.completions.create(model=f"a{i % 8}", prompt=PROMPTS[i % 8], max_tokens=2,
                                                        temperature=0), range(500)))
    gc.collect()
    assert sum(isinstance(o, Request) for o in gc.get_objects()) <= before
    code, health = raw(server, "/health", None, method="GET")
    assert code == 200 and health["status"] == "ok" and health["running"] == 0 and health["queued"] == 0
    with urllib.request.urlopen(server.url + "/metrics") as r:
        text = r.read().decode()
    assert "slimtune_requests_total" in text and 'slimtune_adapter_requests_total{adapter="a0"}' in text
    assert server.service.engine.error is None


def test_a_full_queue_answers_429_and_adapters_beyond_the_bound_are_evicted(tiny_dir, adapters):
    cfg = ServeConfig(model=tiny_dir, adapter=[f"a{i}={adapters[f'a{i}']}" for i in range(4)], port=0,
                      max_loaded=2, max_batch=1, max_queue=1, max_tokens=32)
    s = Server.start(cfg)
    try:
        body = json.dumps({"model": "a0", "prompt": "Count", "max_tokens": 32, "temperature": 0})
        with cf.ThreadPoolExecutor(12) as ex:
            codes = list(ex.map(lambda _: raw(s, "/v1/completions", body)[0], range(12)))
        assert 429 in codes and 200 in codes
        for i in range(4):  # four adapters through two slots
            assert raw(s, "/v1/completions", json.dumps({"model": f"a{i}", "prompt": "x", "max_tokens": 2,
                                                          "temperature": 0}))[0] == 200
        assert len(s.service.pool.loaded) == 2 and s.service.pool.evictions >= 2
    finally:
        s.stop()


def test_an_api_key_is_required_off_the_loopback_and_checked_when_set(tiny_dir):
    from slimtune.serve.app import check_bind

    with pytest.raises(slimtune.SlimtuneError, match="api_key"):
        check_bind("0.0.0.0", None)
    s = Server.start(ServeConfig(model=tiny_dir, port=0, api_key="sekrit"))
    try:
        assert raw(s, "/v1/models", None, method="GET")[0] == 401
        assert raw(s, "/v1/models", None, method="GET", headers={"Authorization": "Bearer sekrit"})[0] == 200
    finally:
        s.stop()


def test_the_judge_path_runs_against_this_server(server, tiny_dir, tmp_path):
    """slimtune eval's judge asks this server (model a0 as the judge): every answer is scored or
    counted unparseable, nothing fails."""
    rows = tmp_path / "q.jsonl"
    rows.write_text("".join(json.dumps({"instruction": p, "output": "x"}) + "\n" for p in PROMPTS[:3]))
    s = slimtune.run_eval(slimtune.EvalConfig(model=tiny_dir, data=[str(rows)], max_new_tokens=4,
                                              out=str(tmp_path / "e.jsonl"), judge_url=server.url + "/v1",
                                              judge_model="a0"))
    assert s["judge_scored"] + s["judge_unparseable"] == 3
