"""Bad input: each case gives an error naming the value, the cause and the fix; all at once."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import clone, tiny, tiny_preset

import slimtune
from slimtune import LowRankConfig, config_from_dict
from slimtune.configs import to_dict
from slimtune.errors import SlimtuneError


@pytest.mark.parametrize("overrides,expected", [
    ({"r": 0}, "r=0: the rank must be a positive integer"),
    ({"dropout": 1.5}, "dropout=1.5"),
    ({"targets": []}, "targets=[]"),
])
def test_invalid_lowrank_values(overrides, expected):
    with pytest.raises(SlimtuneError, match="Fix:") as e:
        slimtune.preset("lora", **overrides)
    assert expected in str(e.value)


def test_all_problems_reported_together():
    data = to_dict(slimtune.preset("lora"))
    data.update(alpah=4, A={"mode": "tide", "init": "kaiming_uniform", "share": "kind"}, dropout="high")
    with pytest.raises(SlimtuneError) as e:
        config_from_dict(data)
    msg = str(e.value)
    assert "3 problems" in msg and "'alpah'" in msg and "did you mean 'alpha'" in msg
    assert "dropout='high'" in msg and "A.mode='tide'" in msg


def test_unknown_method_suggests():
    with pytest.raises(SlimtuneError, match=r"did you mean 'vera'"):
        slimtune.preset("verra")


def test_two_zero_factors_refused():
    with pytest.raises(SlimtuneError, match="two zero factors"):
        slimtune.preset("vera", B=slimtune.Part("random", "zeros", "model"))


def test_target_matching_nothing_lists_names():
    with pytest.raises(SlimtuneError) as e:
        slimtune.add_adapter(tiny("llama"), slimtune.preset("lora", targets=["q_proj", "qkv"]))
    assert "'qkv'" in str(e.value) and "q_proj" in str(e.value) and "'q_proj'" not in str(e.value).split(":")[0]


@pytest.mark.parametrize("name", ["lr0.5", "", "a/b", 3])
def test_an_adapter_name_torch_cannot_key_is_refused_by_name(name):
    model = tiny("llama")
    with pytest.raises(SlimtuneError, match="adapter name") as e:
        slimtune.add_adapter(model, tiny_preset("lora"), name=name)
    assert repr(str(name)) in str(e.value) and not any(p.requires_grad is False for p in model.parameters())


def test_second_adapter_refused():
    model = slimtune.add_adapter(tiny("llama"), tiny_preset("lora"))
    with pytest.raises(SlimtuneError, match="already carries an adapter"):
        slimtune.add_adapter(model, tiny_preset("lora"))


def test_load_into_wrong_architecture(tmp_path):
    slimtune.save_adapter(slimtune.add_adapter(tiny("llama"), tiny_preset("lora")), tmp_path)
    with pytest.raises(SlimtuneError, match="architecture 'LlamaForCausalLM'"):
        slimtune.load_adapter(tiny("gpt2"), tmp_path)


def test_load_into_wrong_shapes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import LLAMA_LIKE
    slimtune.save_adapter(slimtune.add_adapter(tiny("llama"), tiny_preset("lora")), tmp_path)
    wider = LlamaForCausalLM(LlamaConfig(**{**LLAMA_LIKE, "intermediate_size": 64}))
    with pytest.raises(SlimtuneError, match=r"mlp.up_proj.*\(in, out\)=\(32, 48\).*this model's is \(32, 64\)"):
        slimtune.load_adapter(wider, tmp_path)


def test_load_missing_files_and_bad_json(tmp_path):
    with pytest.raises(SlimtuneError, match="adapter_config.json.*does not exist"):
        slimtune.load_adapter(tiny("llama"), tmp_path)
    slimtune.save_adapter(slimtune.add_adapter(tiny("llama"), tiny_preset("lora")), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(SlimtuneError, match="not valid JSON"):
        slimtune.load_adapter(tiny("llama"), tmp_path)


@pytest.mark.parametrize("config, expected", [
    ({"peft_type": "LOHA", "r": 8, "target_modules": ["q_proj"]}, "peft_type='LOHA': slimtune reads PEFT's"),
    ({"peft_type": "LORA", "target_modules": ["q_proj"]}, "a PEFT LORA config without 'r'"),
    ({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], "use_dora": True}, "use_dora=True"),
    ({"format": "something"}, "neither slimtune's adapter format nor PEFT's"),
    ({"format": "slimtune-adapter"}, "no 'config' section"),
])
def test_load_unsupported_or_damaged_configs_is_named(tmp_path, config, expected):
    slimtune.save_adapter(slimtune.add_adapter(tiny("llama"), tiny_preset("lora")), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = tiny("llama")
    with pytest.raises(SlimtuneError, match=expected):
        slimtune.load_adapter(model, tmp_path)
    assert not slimtune.adapter_names(model)


@pytest.mark.parametrize("method", ["lora", "tied-lora"])  # PEFT's format, slimtune's
def test_load_a_file_missing_a_tensor(tmp_path, method):
    from safetensors.torch import load_file, save_file
    slimtune.save_adapter(slimtune.add_adapter(tiny("llama"), tiny_preset(method)), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    dropped = sorted(k for k in tensors if "down_proj" in k)[0]
    del tensors[dropped]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    module = dropped.removeprefix("base_model.model.").split(".lora_")[0].rsplit(".", 1)[0]
    with pytest.raises(SlimtuneError, match=f"tensor '{module}\\.[AB]?.*missing"):
        slimtune.load_adapter(tiny("llama"), tmp_path)


def test_non_finite_merge_refused_and_nothing_changed():
    model = slimtune.add_adapter(tiny("llama"), tiny_preset("lora"))
    layer_B = next(iter(slimtune.trainable_parameters(model).values()))
    with torch.no_grad():
        layer_B.fill_(float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlimtuneError, match="inf or NaN"):
        slimtune.merge_adapters(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_save_frozen_round_trips(tmp_path):
    """VeRA's frozen pair is saved (PEFT's save_projection) only when asked, and loads back."""
    from safetensors.torch import load_file

    from conftest import batch, logits, perturb
    base = tiny("llama")
    model = slimtune.add_adapter(clone(base), slimtune.preset("vera", r=16, save_frozen=True))
    perturb(model)
    slimtune.save_adapter(model, tmp_path)
    assert "base_model.vera_A" in load_file(tmp_path / "adapter_model.safetensors")
    plain = slimtune.add_adapter(clone(base), slimtune.preset("vera", r=16))
    slimtune.save_adapter(plain, tmp_path / "plain")
    assert "base_model.vera_A" not in load_file(tmp_path / "plain" / "adapter_model.safetensors")
    x = batch(base)
    assert torch.equal(logits(slimtune.load_adapter(clone(base), tmp_path), x), logits(model, x))


def test_config_file_and_flags_give_the_same_config(tmp_path):
    import yaml

    from slimtune.cli.main import adapter_config, build_parser
    cfg = slimtune.preset("vera", r=64, dropout=0.1)
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    args = build_parser().parse_args(["params", "--config", str(tmp_path / "a.yaml")])
    from_file = adapter_config(args, "lora", str(tmp_path / "a.yaml"))
    args = build_parser().parse_args(["params", "--method", "vera", "--r", "64", "--dropout", "0.1"])
    from_flags = adapter_config(args, "vera", None)
    assert from_file == from_flags == cfg
    assert isinstance(cfg, LowRankConfig)
