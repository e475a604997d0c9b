"""Faults and attacks, each reproduced against a running server over real HTTP: broken
adapters, cross-site and DNS-rebinding requests, adapter paths and names from clients, clients
that leave, inputs that used to give a 500, errors outside OpenAI's shape, and what the key
guards."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import slimtune
from slimtune.cli.main import main as cli_main
from slimtune.serve.config import ServeConfig
from slimtune.serve.server import Server, free_port
from slimtune.serve.service import label
from test_serve import save_perturbed

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def dirs(tiny_dir, tmp_path_factory):
    """allowed/ (the server's --adapter_dir) with a good adapter, and outside/ with another."""
    root = tmp_path_factory.mktemp("security")
    g = torch.Generator().manual_seed(2)
    save_perturbed(tiny_dir, "lora", root / "allowed" / "good", g)
    save_perturbed(tiny_dir, "ia3", root / "outside" / "other", g)
    return root


def corrupt(directory: Path) -> None:
    (directory / "adapter_model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 10)


@pytest.fixture(scope="module")
def server(tiny_dir, dirs):
    s = Server.start(ServeConfig(model=tiny_dir, adapter=[f"good={dirs / 'allowed' / 'good'}"], port=0,
                                 adapter_dir=[str(dirs / "allowed")], max_tokens=2000, max_prompt_tokens=256,
                                 max_body_bytes=16384))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(tiny_dir):
    """A server with a key and one allowed origin, and no --adapter_dir."""
    s = Server.start(ServeConfig(model=tiny_dir, port=0, api_key="sekrit", allowed_origins=["http://localhost:3000"]))
    yield s
    s.stop()


def call(server, method: str, path: str, body=None, headers: dict | None = None, json_body: bool = True):
    """(status, parsed JSON or text, headers) over a plain connection; Host and Content-Type as given."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    data = json.dumps(body) if json_body and body is not None and not isinstance(body, (str, bytes)) else body
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    conn.request(method, path, data, {**hdrs, **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    try:
        out = json.loads(raw)
    except ValueError:
        out = raw.decode(errors="replace")
    return r.status, out, dict(r.getheaders())


def openai_shaped(reply) -> bool:
    return isinstance(reply, dict) and set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param",
                                                                                        "code"}


def wait_idle(server, seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while server.service.engine.running and time.time() < deadline:
        time.sleep(0.02)


# ---- broken adapters ----------------------------------------------------------------------------
def test_a_broken_adapter_stops_the_start_with_a_clear_error(tiny_dir, dirs, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(dirs / "allowed" / "good", bad)
    corrupt(bad)
    with pytest.raises(slimtune.SlimtuneError, match="safetensors"):
        Server.start(ServeConfig(model=tiny_dir, port=0, adapter=[f"bad={bad}"]))
    assert cli_main(["serve", "--model", tiny_dir, "--adapter", f"bad={bad}", "--port", str(free_port())]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    with pytest.raises(slimtune.SlimtuneError, match="names are"):
        Server.start(ServeConfig(model=tiny_dir, port=0, adapter=[f"a:b={dirs / 'allowed' / 'good'}"]))


def test_a_broken_adapter_is_refused_when_registered_and_others_run_on(server, dirs):
    bad = dirs / "allowed" / "bad"
    shutil.copytree(dirs / "allowed" / "good", bad)
    corrupt(bad)
    results: list = []
    body = {"model": "good", "prompt": "Count", "max_tokens": 64, "ignore_eos": True, "temperature": 0}
    other = threading.Thread(target=lambda: results.append(call(server, "POST", "/v1/completions", body)))
    other.start()
    status, reply, _ = call(server, "POST", "/v1/adapters", {"name": "bad", "path": str(bad)})
    assert status == 400 and openai_shaped(reply) and "safetensors" in reply["error"]["message"]
    other.join()
    assert results[0][0] == 200 and results[0][1]["choices"][0]["finish_reason"] == "length"
    assert results[0][1]["usage"]["completion_tokens"] == 64
    assert "bad" not in server.service.pool.known


def test_an_adapter_broken_after_registration_fails_only_its_own_requests(server, dirs):
    late = dirs / "allowed" / "late"
    shutil.copytree(dirs / "allowed" / "good", late)
    assert call(server, "POST", "/v1/adapters", {"name": "late", "path": str(late)})[0] == 200
    corrupt(late)  # changed on disk after it was checked: the first request loads it
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": "good", "prompt": "Count", "max_tokens": 200,
                                                        "ignore_eos": True, "temperature": 0, "stream": True,
                                                        "stream_options": {"include_usage": True}}),
                 {"Content-Type": "application/json"})
    stream = conn.getresponse()
    assert stream.readline().startswith(b"data: ")  # running
    status, reply, _ = call(server, "POST", "/v1/completions", {"model": "late", "prompt": "x", "max_tokens": 4})
    assert status == 500 and openai_shaped(reply) and "'late' failed to load" in reply["error"]["message"]
    assert server.service.engine.running == 1  # the stream was running all along
    events = [json.loads(line[6:]) for line in stream.read().decode().splitlines()
              if line.startswith("data: {")]
    conn.close()
    assert events[-1]["usage"]["completion_tokens"] == 200
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["length"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError, match="'late' failed to load"):
        client.completions.create(model="late", prompt="x", max_tokens=4)
    with pytest.raises(openai.APIError, match="'late' failed to load"):  # a stream says so in an event
        list(client.completions.create(model="late", prompt="x", max_tokens=4, stream=True))
    assert server.service.engine.error is None and server.service.engine.running == 0


# ---- cross-site requests and DNS rebinding ------------------------------------------------------
def test_cross_site_and_rebound_requests_are_refused(server, dirs):
    body = {"model": "good", "prompt": "x", "max_tokens": 1}
    own = f"{server.host}:{server.port}"
    for path, b in [("/v1/completions", body), ("/v1/adapters", {"name": "x", "path": str(dirs / "allowed" / "good")})]:
        status, reply, _ = call(server, "POST", path, json.dumps(b), {"Content-Type": "text/plain",
                                                                      "Origin": "http://evil.example"})
        assert status == 403 and reply["error"]["param"] == "origin"
        status, reply, _ = call(server, "POST", path, json.dumps(b), {"Content-Type": "text/plain"})
        assert status == 415 and openai_shaped(reply)
    assert call(server, "GET", "/v1/models", headers={"Origin": "null"})[0] == 403
    assert call(server, "POST", "/v1/completions", body, {"Origin": f"http://{own}"})[0] == 200  # its own page
    for host in ["evil.example", f"evil.example:{server.port}", f"127.0.0.1:{server.port + 1}",
                 f"127.0.0.1.nip.io:{server.port}"]:
        status, reply, _ = call(server, "GET", "/v1/models", headers={"Host": host})
        assert status == 421 and reply["error"]["param"] == "host", host
    for host in [own, f"localhost:{server.port}", "localhost", f"[::1]:{server.port}"]:
        assert call(server, "GET", "/v1/models", headers={"Host": host})[0] == 200, host


def test_an_allowed_origin_may_call_and_gets_cors_headers(keyed):
    key = {"Authorization": "Bearer sekrit"}
    status, _, headers = call(keyed, "GET", "/v1/models", headers={**key, "Origin": "http://localhost:3000"})
    assert status == 200 and headers.get("access-control-allow-origin") == "http://localhost:3000"
    status, _, headers = call(keyed, "OPTIONS", "/v1/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert status == 200 and headers.get("access-control-allow-origin") == "http://localhost:3000"
    assert call(keyed, "GET", "/v1/models", headers={**key, "Origin": "http://localhost:4000"})[0] == 403


# ---- which directories adapters load from -------------------------------------------------------
def test_adapters_register_only_from_under_adapter_dir(server, keyed, dirs):
    key = {"Authorization": "Bearer sekrit"}
    status, reply, _ = call(keyed, "POST", "/v1/adapters", {"name": "x", "path": str(dirs / "allowed" / "good")}, key)
    assert status == 403 and "--adapter_dir" in reply["error"]["message"]  # none given: run-time loading is off
    outside = dirs / "outside" / "other"
    link = dirs / "allowed" / "link"
    link.symlink_to(outside, target_is_directory=True)
    for path in [outside, link, dirs / "allowed" / ".." / "outside" / "other", "/etc", "relative/../../etc"]:
        status, reply, _ = call(server, "POST", "/v1/adapters", {"name": "x", "path": str(path)})
        assert status == 403 and reply["error"]["param"] == "path", path
    assert call(server, "POST", "/v1/adapters", {"name": "x", "path": str(dirs / "allowed" / "good")})[0] == 200
    assert call(server, "POST", "/v1/adapters", {"name": "y", "path": "a\x00b"})[0] in (400, 403)


# ---- names ---------------------------------------------------------------------------------------
def test_adapter_names_are_checked_and_metric_labels_escaped(server, dirs):
    evil = 'q"} 1\nslimtune_injected 42\n#'
    status, reply, _ = call(server, "POST", "/v1/adapters", {"name": evil, "path": str(dirs / "allowed" / "good")})
    assert status == 400 and reply["error"]["param"] == "name"
    for name in ["a:b", "", "-x", "x" * 65, "a/b", "v1.2", "base", Path(server.service.base_name).name]:
        assert call(server, "POST", "/v1/adapters", {"name": name, "path": str(dirs / "allowed" / "good")})[0] == 400
    _, text, _ = call(server, "GET", "/metrics")
    assert "slimtune_injected" not in text
    assert label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_a_name_is_bound_to_one_directory(server, dirs):
    good, copy = dirs / "allowed" / "good", dirs / "allowed" / "copy"
    shutil.copytree(good, copy)
    status, reply, _ = call(server, "POST", "/v1/adapters", {"name": "good", "path": str(good)})
    assert status == 200 and reply["changed"] is False  # the same directory: nothing to do
    status, reply, _ = call(server, "POST", "/v1/adapters", {"name": "good", "path": str(copy)})
    assert status == 409 and reply["error"]["code"] == "adapter_exists"
    assert server.service.pool.known["good"] == os.path.realpath(good)


# ---- clients that leave ---------------------------------------------------------------------------
def test_a_plain_request_whose_client_leaves_frees_its_row(server):
    wait_idle(server)
    before = server.service.engine.stats["tokens"]
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": "good", "prompt": "Count", "max_tokens": 2000,
                                                        "ignore_eos": True, "temperature": 0}),
                 {"Content-Type": "application/json"})
    deadline = time.time() + 10
    while not server.service.engine.running and time.time() < deadline:
        time.sleep(0.01)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_idle(server)
    assert server.service.engine.running == 0
    assert server.service.engine.stats["tokens"] - before < 2000  # freed, not decoded to max_tokens


# ---- inputs that gave a 500 ----------------------------------------------------------------------
BAD_BODIES = {
    "seed 10**30": '{"model": "good", "prompt": "x", "seed": 1000000000000000000000000000000}',
    "lone surrogate in prompt": '{"model": "good", "prompt": "a\\ud800"}',
    "lone surrogate in a message": '{"model": "good", "messages": [{"role": "user", "content": "a\\ud800"}]}',
    "deep nesting": '{"model": "good", "prompt": "x", "user": ' + "[" * 5000 + "]" * 5000 + "}",
    "temperature NaN": '{"model": "good", "prompt": "x", "temperature": NaN}',
    "top_p NaN": '{"model": "good", "prompt": "x", "top_p": NaN}',
    "temperature Infinity": '{"model": "good", "prompt": "x", "temperature": Infinity}',
    "invalid UTF-8": b'{"model": "good", "prompt": "\xff"}',
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_inputs_that_gave_a_500_are_400s(server, name):
    path = "/v1/chat/completions" if "message" in name else "/v1/completions"
    status, reply, _ = call(server, "POST", path, BAD_BODIES[name])
    assert status == 400 and openai_shaped(reply), reply


# ---- every error in OpenAI's shape ---------------------------------------------------------------
def raw_socket(server, data: bytes) -> tuple[int, object]:
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_every_error_is_in_openais_shape(server):
    status, reply, _ = call(server, "POST", "/v1/nothing", {})
    assert status == 404 and openai_shaped(reply)
    status, reply, headers = call(server, "GET", "/v1/completions")
    assert status == 405 and openai_shaped(reply) and "POST" in headers.get("allow", "")
    host = f"Host: {server.host}:{server.port}\r\nContent-Type: application/json\r\n".encode()
    for length in [b"abc", b"-1", b"5, 6"]:  # uvicorn answers these itself, before the app
        status, reply = raw_socket(server, b"POST /v1/completions HTTP/1.1\r\n" + host + b"Content-Length: " + length +
                                   b"\r\nConnection: close\r\n\r\n{}")
        assert status == 400 and openai_shaped(reply), length
    status, reply = raw_socket(server, b"POST /v1/completions HTTP/1.1\r\n" + host +
                               b"Content-Length: 99999999\r\nConnection: close\r\n\r\n{}")
    assert status == 413 and openai_shaped(reply)
    chunked = b"".join(b"%x\r\n%s\r\n" % (10000, b" " * 10000) for _ in range(2)) + b"0\r\n\r\n"  # all read
    status, reply = raw_socket(server, b"POST /v1/completions HTTP/1.1\r\n" + host +
                               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked)
    assert status == 413 and openai_shaped(reply)  # no Content-Length: counted as it is read


# ---- what the key guards ------------------------------------------------------------------------
def test_with_a_key_metrics_need_it_and_health_tells_only_ok(keyed):
    key = {"Authorization": "Bearer sekrit"}
    assert call(keyed, "GET", "/metrics")[0] == 401
    assert call(keyed, "GET", "/metrics", headers={"Authorization": "Bearer wrong"})[0] == 401
    status, text, _ = call(keyed, "GET", "/metrics", headers=key)
    assert status == 200 and "slimtune_requests_total" in text
    assert call(keyed, "GET", "/health")[:2] == (200, {"status": "ok"})
    status, health, _ = call(keyed, "GET", "/health", headers=key)
    assert status == 200 and "adapters_loaded" in health
    assert call(keyed, "GET", "/v1/nothing")[0] == 401  # every path but /health
