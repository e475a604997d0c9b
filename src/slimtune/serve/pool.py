"""The adapters a server knows, loaded onto its one base model on demand.

    pool = AdapterPool(model, tokenizer, max_loaded=8)
    pool.register("support", "runs/support/adapter")      # known: loaded when first asked for
    pool.add_gist("support:french", "support", "fr.safetensors")

At most `max_loaded` adapters sit on the model at once; asking for another evicts the least
recently used one that no running row uses (and waits, if all of them are in use). Loading
and unloading never reload the base. Every change to the model happens on the engine's
thread, between two decoding steps (`ensure` is called from there; `call_on_engine` brings
other changes there).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from ..adapters.inject import adapter_names, delete_adapter
from ..errors import Problems
from ..eval.gist_cache import GistCache, load_cache
from ..formats.adapter import load_adapter
from ..recipes.gist import identity


class AdapterPool:
    def __init__(self, model, tokenizer, max_loaded: int = 8):
        self.model, self.tok = model, tokenizer
        self.max_loaded = max_loaded
        self.known: dict[str, str] = {}  # name -> directory
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.gists: dict[str, tuple[str, GistCache]] = {}  # "adapter:gist" -> (adapter, cache)
        self.loads = 0
        self.evictions = 0

    def register(self, name: str, directory: str) -> None:
        p = Problems("cannot register the adapter")
        if not name or ":" in name or "/" in name:
            p.add(f"adapter name {name!r}", "names are plain words (':' separates a gist cache's name)",
                  "use e.g. support=runs/support/adapter")
        if not (Path(directory) / "adapter_config.json").is_file():
            p.add(f"adapter {name}={directory!r}", "no adapter_config.json there", "point at a saved adapter directory")
        p.raise_if_any()
        self.known[name] = str(directory)

    def ensure(self, name: str, in_use: set) -> bool | None:
        """Adapter `name` on the model (loading it, evicting the least recently used unused one
        if the bound is reached); False if every loaded adapter is in use, None if the name is
        not known (any more)."""
        if name not in self.known:
            return None
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return True
        while len(self.loaded) >= self.max_loaded:
            victim = next((n for n in self.loaded if n not in in_use), None)
            if victim is None:
                return False
            self.unload(victim)
            self.evictions += 1
        load_adapter(self.model, self.known[name], name=name, tokenizer=self.tok)
        self.loaded[name] = None
        self.loads += 1
        return True

    def unload(self, name: str) -> None:
        if name in adapter_names(self.model):
            delete_adapter(self.model, name)
        self.loaded.pop(name, None)

    def add_gist(self, key: str, adapter: str, path: str) -> None:
        """A saved gist cache, usable as model `adapter:gist`; it must have been made with `adapter`."""
        if not self.ensure(adapter, set()):
            p = Problems("cannot serve the gist cache")
            p.add(f"gist {key}={path!r}", f"adapter {adapter!r} is not known", f"pass --adapter {adapter}=DIR too")
            p.raise_if_any()
        cache = load_cache(Path(path), identity(self.model, adapter))
        self.gists[key] = (adapter, cache)

    def models(self) -> list[str]:
        return sorted(self.known) + sorted(self.gists)
