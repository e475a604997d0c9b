"""slimtune: parameter-efficient fine-tuning, side by side.

    import slimtune
    model = slimtune.load_model()                       # SmolLM2-135M-Instruct
    slimtune.add_adapter(model, slimtune.preset("vera"))
    print(slimtune.count_parameters(model))

This module is the package's face for users: library code never imports it. The layers, from
the bottom: errors and configs, models, adapters, formats, data, eval, train, recipes, cli
(docs/architecture.md).
"""

from .adapters import (AdapterConfig, AdapterRoot, AuxLoss, IA3Config, LowRankConfig, Method, MoLoRAConfig,
                       MoVConfig, Part, PESCConfig, SiteAdapter,
                       active_adapter, adapter_rows, add_adapter, adapter_names, config_from_dict, count_parameters,
                       delete_adapter, disable_adapters, get_config, merge_adapters, merge_and_unload,
                       merged_state_dict, param_groups, preset, register_method, register_preset, router_stats,
                       set_active_adapter, set_trainable, trainable_parameters, unmerge_adapters, upcycle)
from .adapters.gist import add_gist_tokens, gist_tokens
from .adapters.registry import ALIASES, PRESETS
from .errors import SlimtuneError
from .eval.config import EvalConfig, GenerateConfig
from .formats import export_peft_lora, load_adapter, save_adapter
from .eval.gist_cache import GistCache, load_cache as load_gist_cache, save_cache as save_gist_cache
from .models import DEFAULT_MODEL, build_on_meta, load_model, load_tokenizer
from .models.gist import GistTokens, add_gist_token
from .recipes.evaluate import run_eval
from .recipes.gist import answer_with_gists, compress_gist, gist_inputs
from .recipes.jobs import run_jobs
from .recipes.train import run_training
from .train.config import TrainConfig
from .version import __version__

__all__ = [
    "ALIASES", "AdapterConfig", "GistCache", "GistTokens", "add_gist_token", "add_gist_tokens", "answer_with_gists",
    "compress_gist", "gist_inputs", "gist_tokens", "load_gist_cache", "save_gist_cache", "AdapterRoot", "AuxLoss", "DEFAULT_MODEL", "EvalConfig", "GenerateConfig",
    "IA3Config", "LowRankConfig", "Method", "MoLoRAConfig", "MoVConfig", "PESCConfig", "PRESETS", "Part", "SiteAdapter", "SlimtuneError", "TrainConfig",
    "__version__", "active_adapter", "adapter_rows", "add_adapter", "adapter_names", "build_on_meta", "config_from_dict",
    "count_parameters", "delete_adapter", "disable_adapters", "export_peft_lora", "get_config", "load_adapter",
    "load_model", "load_tokenizer", "merge_adapters", "merge_and_unload", "merged_state_dict", "param_groups",
    "preset", "register_method", "register_preset", "run_eval", "run_jobs", "run_training", "save_adapter",
    "router_stats", "set_active_adapter", "set_trainable", "trainable_parameters", "unmerge_adapters", "upcycle",
]
