"""`slimtune serve`: its typed config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..configs import at_least, field
from ..errors import Problems


@dataclass
class ServeConfig:
    """An OpenAI-compatible server for a base model and any number of adapters."""

    model: str = field("smollm2-135m", "base model: 'smollm2-135m', a local directory, or a hub name")
    adapter: list[str] = field([], "NAME=DIR, repeatable: adapters the server knows (checked at start, loaded when "
                               "first asked for)")
    adapter_dir: list[str] = field([], "DIR, repeatable: POST /v1/adapters may register adapters from under these "
                                   "directories only (symbolic links resolved); none: run-time registration is off")
    gist: list[str] = field([], "ADAPTER:NAME=FILE, repeatable: a gist cache served as model 'ADAPTER:NAME'")
    host: str = field("127.0.0.1", "address to bind; any other than the loopback needs --api_key")
    port: int = field(8000, "port to bind")
    api_key: str | None = field(None, "required of clients (Authorization: Bearer KEY) when set, on every path but "
                                "/health")
    allowed_origins: list[str] = field([], "ORIGIN, repeatable (e.g. http://localhost:3000): web pages that may call "
                                       "the server; requests from any other page's origin are refused")
    max_loaded: int = field(8, "adapters on the model at once; the least recently used unused one is evicted")
    max_batch: int = field(32, "rows decoded together (concurrent requests); more wait in the queue")
    max_queue: int = field(64, "requests that may wait; more get HTTP 429")
    max_prompt_tokens: int = field(2048, "longest prompt accepted")
    max_tokens: int = field(512, "largest max_tokens accepted (and the chat default)")
    max_body_bytes: int = field(1 << 20, "largest request body accepted")
    device: str = field("auto", "auto | cpu | cuda | cuda:N")

    def problems(self, p: Problems) -> None:
        for name in ("max_loaded", "max_batch", "max_prompt_tokens", "max_tokens", "max_body_bytes"):
            at_least(p, name, getattr(self, name), 1)
        at_least(p, "max_queue", self.max_queue, 0)
        if not 0 < self.port < 65536:
            p.add(f"port={self.port}", "not a TCP port", "give 1..65535")
        for spec in self.adapter:
            if "=" not in spec:
                p.add(f"adapter={spec!r}", "expected NAME=DIR", "e.g. --adapter support=runs/support/adapter")
        for d in self.adapter_dir:
            if not Path(d).is_dir():
                p.add(f"adapter_dir={d!r}", "no such directory", "name an existing directory that holds adapters")
        for o in self.allowed_origins:
            if not o.startswith(("http://", "https://")) or o.rstrip("/").count("/") != 2:
                p.add(f"allowed_origins={o!r}", "an origin is scheme://host[:port], nothing after",
                      "e.g. --allowed_origins http://localhost:3000")
        for spec in self.gist:
            if "=" not in spec or ":" not in spec.split("=", 1)[0]:
                p.add(f"gist={spec!r}", "expected ADAPTER:NAME=FILE", "e.g. --gist support:french=fr.safetensors")
