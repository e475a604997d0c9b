"""The adapters a server knows, loaded onto its one base model on demand.

    pool = AdapterPool(model, tokenizer, max_loaded=8)
    pool.register("support", "runs/support/adapter")      # known: loaded when first asked for
    pool.add_gist("support:french", "support", "fr.safetensors")

At most `max_loaded` adapters sit on the model at once; asking for another evicts the least
recently used one that no running row uses (and waits, if all of them are in use). Loading
and unloading never reload the base. Every change to the model happens on the engine's
thread, between two decoding steps (`ensure` is called from there; the service brings
`register` and `unload` there with `Engine.call_later`).

Registering checks the adapter by loading it once (config, weights, the fit to the base) and
unloading it again, so that a broken directory is refused when it is named, not when a
request first asks for it. The directory is kept with its symbolic links resolved. Names are
plain words, `[A-Za-z0-9][A-Za-z0-9._-]{0,63}` (no ':', which separates a gist cache's name, and
nothing that needs escaping in a URL or a metric label). A name is bound to one directory:
naming it again with the same directory changes nothing, with another is a `Conflict`.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path

from ..adapters.inject import ADAPTER_NAME, NAME_RULE, adapter_names, delete_adapter
from ..errors import Problem, Problems, SlimtuneError
from ..eval.gist_cache import GistCache, load_cache
from ..formats.adapter import load_adapter
from ..recipes.gist import identity


GIST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a gist cache's name keys nothing in torch


class Conflict(SlimtuneError):
    """The name is taken by another adapter directory (HTTP 409)."""


def check_name(p: Problems, name: str) -> None:
    """An adapter's name: it keys torch submodules, so no '.'."""
    if not ADAPTER_NAME.fullmatch(name):
        p.add(f"adapter name {name[:80]!r}", NAME_RULE + " (':' separates a gist cache's name)",
              "use e.g. support=runs/support/adapter")


def check_gist_name(p: Problems, name: str) -> None:
    if not GIST_NAME.fullmatch(name):
        p.add(f"gist name {name[:80]!r}", "names are 1-64 letters, digits, '.', '_' or '-', starting with a letter "
              "or digit", "use e.g. --gist support:french=fr.safetensors")


class AdapterPool:
    def __init__(self, model, tokenizer, max_loaded: int = 8, reserved: set[str] = frozenset()):
        self.model, self.tok = model, tokenizer
        self.max_loaded = max_loaded
        self.reserved = set(reserved)  # names the server answers to itself (the base's)
        self.known: dict[str, str] = {}  # name -> directory (symbolic links resolved)
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.gists: dict[str, tuple[str, GistCache]] = {}  # "adapter:gist" -> (adapter, cache)
        self.loads = 0
        self.evictions = 0

    def register(self, name: str, directory: str) -> bool:
        """Know adapter `name` at `directory`, once loading it has succeeded; False if it is known
        there already (nothing to do). Raises SlimtuneError if it cannot be loaded, Conflict if
        the name is taken."""
        p = Problems("cannot register the adapter")
        check_name(p, name)
        if name in self.reserved:
            p.add(f"adapter name {name!r}", "it is the base model's name", "pick another name")
        p.raise_if_any()
        real = os.path.realpath(directory)
        if self.known.get(name, real) != real:
            raise Conflict(Problem(f"adapter {name!r}", f"it is registered already, from {self.known[name]!r}",
                                   f"DELETE /v1/adapters/{name} first, or pick another name"))
        if name in self.known:
            return False
        if name in self.loaded:
            raise Conflict(Problem(f"adapter {name!r}", "it was just deleted and is still being unloaded",
                                   "retry in a moment"))
        try:  # a full load is the only complete check; the first request loads it again
            load_adapter(self.model, real, name=name, tokenizer=self.tok)
        except SlimtuneError:
            raise
        except Exception as e:  # a failure the loader does not explain itself
            p.add(f"adapter {name}={directory!r}", f"it could not be loaded ({type(e).__name__}: {e})",
                  "point at a directory written by slimtune.save_adapter or by PEFT")
            p.raise_if_any()
        delete_adapter(self.model, name)
        self.known[name] = real
        return True

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
        p = Problems("cannot serve the gist cache")
        check_gist_name(p, key.split(":", 1)[-1])
        p.raise_if_any()
        cache = load_cache(Path(path), identity(self.model, adapter))
        self.gists[key] = (adapter, cache)

    def models(self) -> list[str]:
        return sorted(self.known) + sorted(self.gists)
