"""Adapters on disk: PEFT's format where PEFT can express the adapter, slimtune's own
otherwise (adapter.py, peft.py), exports for servers (LoRA) and for plain transformers
(a merged model), and the safe file reading and writing under them (files.py, sharding.py)."""

from .adapter import export_peft_lora, load_adapter, load_adapter_weights, read_adapter, save_adapter

__all__ = ["export_peft_lora", "load_adapter", "load_adapter_weights", "read_adapter", "save_adapter"]
