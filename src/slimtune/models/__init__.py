"""The base model: loading it (load.py), the facts adapters need about its layers
(layers.py), a frozen quantised copy of it (quantize.py) and the attention masks it takes
(attention.py). Nothing here knows about adapters."""

from .load import DEFAULT_MODEL, build_on_meta, load_model, load_tokenizer, resolve_device, shipped_configs

__all__ = ["DEFAULT_MODEL", "build_on_meta", "load_model", "load_tokenizer", "resolve_device", "shipped_configs"]
