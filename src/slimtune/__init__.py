"""slimtune: parameter-efficient fine-tuning, side by side.

    import slimtune
    model = slimtune.load_model()                       # SmolLM2-135M-Instruct
    slimtune.add_adapter(model, slimtune.preset("vera"))
    print(slimtune.count_parameters(model))
"""

__version__ = "0.1.0"

from .config import EvalConfig, IA3Config, LowRankConfig, Part, TrainConfig, config_from_dict  # noqa: E402
from .errors import SlimtuneError  # noqa: E402
from .inject import add_adapter, get_config  # noqa: E402
from .io import load_adapter, save_adapter  # noqa: E402
from .models import DEFAULT_MODEL, build_on_meta, load_model, load_tokenizer  # noqa: E402
from .ops import (  # noqa: E402
    count_parameters,
    disable_adapters,
    merge_adapters,
    merge_and_unload,
    merged_state_dict,
    set_trainable,
    trainable_parameters,
    unmerge_adapters,
)
from .presets import PRESETS, preset  # noqa: E402
from .job import run_training  # noqa: E402
from .evaljob import run_eval  # noqa: E402

__all__ = [
    "IA3Config", "LowRankConfig", "Part", "config_from_dict", "add_adapter", "get_config", "load_adapter",
    "save_adapter", "DEFAULT_MODEL", "build_on_meta", "load_model", "load_tokenizer", "count_parameters",
    "disable_adapters", "merge_adapters", "merge_and_unload", "merged_state_dict", "set_trainable",
    "trainable_parameters", "unmerge_adapters", "PRESETS", "preset", "SlimtuneError", "TrainConfig", "EvalConfig", "run_training",
    "run_eval",
]
