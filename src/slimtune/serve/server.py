"""`slimtune serve`: the model, the pool, the engine and the HTTP API, run by uvicorn.

    server = Server.start(ServeConfig(adapter=["support=runs/support/adapter"]))   # in a thread
    ... openai.OpenAI(base_url=server.url + "/v1", api_key="x") ...
    server.stop()
"""

from __future__ import annotations

import json
import socket
import threading
import time

from ..errors import Problems
from ..models.load import load_model, load_tokenizer, resolve_device
from .app import build_app, check_bind
from .config import ServeConfig
from .engine import Engine
from .guard import Access
from .pool import AdapterPool
from .protocol import ApiError
from .service import Limits, Service


def build_service(cfg: ServeConfig, model=None, tokenizer=None) -> Service:
    """The model, its adapters (each checked by loading it once: a broken one stops the start
    with a SlimtuneError), the engine and the service."""
    check_bind(cfg.host, cfg.api_key)
    if model is None:
        model = load_model(cfg.model).to(resolve_device(cfg.device))
        tokenizer = load_tokenizer(cfg.model)
    model.eval()
    base_name = cfg.model.rstrip("/").rsplit("/", 1)[-1]
    pool = AdapterPool(model, tokenizer, cfg.max_loaded, reserved={base_name, "base"})
    for spec in cfg.adapter:
        name, directory = spec.split("=", 1)
        pool.register(name, directory)
    for spec in cfg.gist:
        key, path = spec.split("=", 1)
        pool.add_gist(key, key.split(":", 1)[0], path)
    engine = Engine(model, tokenizer, pool.ensure, cfg.max_batch, cfg.max_queue)
    limits = Limits(cfg.max_body_bytes, cfg.max_prompt_tokens, cfg.max_tokens)
    access = Access(cfg.host, cfg.api_key, list(cfg.allowed_origins), cfg.max_body_bytes)
    return Service(engine, pool, base_name, limits, access, cfg.adapter_dir)


def http_protocol():
    """uvicorn's HTTP protocol, with the 400 it sends itself in OpenAI's shape. uvicorn answers a
    request it cannot parse (a Content-Length that is not a number, or two that differ; a broken
    request line or header) before the app sees it, in plain text; this writes that answer as
    JSON. Where the protocol has no such hook (another uvicorn), its plain text stays."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    if not callable(getattr(AutoHTTPProtocol, "send_400_response", None)):
        return "auto"

    class Protocol(AutoHTTPProtocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(ApiError(400, f"malformed HTTP request ({msg.rstrip('.')}): check the request line "
                                       "and the headers, Content-Length included").body()).encode()
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    return Protocol


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running server: the engine's thread and uvicorn's."""

    def __init__(self, service: Service, host: str, port: int):
        import uvicorn

        self.service, self.host, self.port = service, host, port
        self.uvicorn = uvicorn.Server(uvicorn.Config(build_app(service), host=host, port=port, log_level="warning",
                                                     access_log=False, http=http_protocol()))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @classmethod
    def start(cls, cfg: ServeConfig, model=None, tokenizer=None) -> "Server":
        server = cls(build_service(cfg, model, tokenizer), cfg.host, cfg.port or free_port())
        server.service.engine.start()
        server.thread = threading.Thread(target=server.uvicorn.run, name="slimtune-http", daemon=True)
        server.thread.start()
        deadline = time.time() + 30
        while not server.uvicorn.started:
            if time.time() > deadline or not server.thread.is_alive():
                server.stop()
                p = Problems("the server did not start")
                p.add(f"{cfg.host}:{cfg.port}", "uvicorn did not come up (is the port in use?)",
                      "pick another --port")
                p.raise_if_any()
            time.sleep(0.02)
        return server

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.service.engine.stop()


def run_server(cfg: ServeConfig) -> None:
    """Serve until interrupted."""
    server = Server.start(cfg)
    print(f"slimtune: serving {server.service.models()} at {server.url}/v1 (Ctrl-C stops)", flush=True)
    try:
        while server.thread.is_alive():
            server.thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
