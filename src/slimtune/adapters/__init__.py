"""Adapters: the contract (protocol.py), the method registry (registry.py), named adapters on
a model (inject.py), which layers they go on (targets.py), the free helpers built on the
contract (helpers.py), one file per method (lowrank.py, ia3.py, mov.py, molora.py, pesc.py,
full.py), gist tokens with any of them (gist.py), and the low-rank family's
fast path (fast/). Importing this package registers the built-in methods.
"""

from .helpers import (collect_aux_losses, count_parameters, disable_adapters, merge_adapters, merge_and_unload,
                      merged_state_dict, param_groups, router_stats, set_trainable, trainable_parameters,
                      unmerge_adapters)
from .ia3 import IA3Config  # importing a method's file registers it
from .inject import (active_adapter, add_adapter, adapter_names, adapter_rows, share_frozen, delete_adapter, get_config, set_active_adapter,
                     sites)
from .lowrank import LowRankConfig, Part
from .molora import MoLoRAConfig
from .mov import MoVConfig
from .pesc import PESCConfig, upcycle
from .full import FullConfig
from .protocol import GROUPS, AdapterRoot, AuxLoss, SiteAdapter
from .registry import (ALIASES, METHODS, PRESETS, AdapterConfig, Method, config_from_dict, preset, preset_config,
                       register_method, register_preset)

__all__ = [
    "ALIASES", "AdapterConfig", "AdapterRoot", "AuxLoss", "FullConfig", "GROUPS", "IA3Config", "LowRankConfig", "METHODS", "MoLoRAConfig", "MoVConfig", "PESCConfig",
    "Method", "PRESETS", "Part", "SiteAdapter", "active_adapter", "add_adapter", "adapter_names", "adapter_rows", "share_frozen",
    "collect_aux_losses", "config_from_dict", "count_parameters", "delete_adapter", "disable_adapters",
    "get_config", "merge_adapters", "merge_and_unload", "merged_state_dict", "param_groups", "preset",
    "preset_config", "register_method", "register_preset", "set_active_adapter", "set_trainable", "sites",
    "trainable_parameters", "unmerge_adapters", "upcycle", "router_stats",
]
