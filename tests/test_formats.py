"""Adapters on disk, checked by the tools that read them: PEFT loads what slimtune saves and
the reverse, PEFT loads each exported plain LoRA, and plain transformers loads the merged
export, all giving slimtune's logits (fp32, atol 1e-5), on tiny Llama, Qwen2 and GPT-2
(Conv1D) models with every adapter tensor random and non-zero."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import batch, clone, logits, perturb, tiny, tiny_preset
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import slimtune
from slimtune.configs import to_dict
from slimtune.formats.adapter import adapter_state_dict, fingerprint

ARCHS = ["llama", "qwen2", "gpt2"]
LOWRANK = ["lora", "vera", "tied-lora", "tied-lora-ba", "tied-lora-paper"]


def adapted(arch, method, **overrides):
    base = tiny(arch).requires_grad_(False)
    cfg = tiny_preset(method) if not overrides else slimtune.preset(method, **overrides)
    model = slimtune.add_adapter(clone(base), cfg)
    perturb(model)
    return base, model


@torch.no_grad()
def peft_logits(base, directory, x):
    return logits(peft.PeftModel.from_pretrained(clone(base), str(directory)).eval(), x)


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method, overrides", [("lora", {}), ("lora", {"rslora": True, "dropout": 0.1}),
                                               ("vera", {"r": 16}), ("vera", {"r": 16, "save_frozen": True}),
                                               ("ia3", {})])
def test_peft_loads_what_slimtune_saves(arch, method, overrides, tmp_path):
    base, model = adapted(arch, method, **overrides)
    model.eval()
    slimtune.save_adapter(model, tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["peft_type"] == {"lora": "LORA", "vera": "VERA", "ia3": "IA3"}[method]
    x = batch(base)
    expected = logits(model, x)
    assert (expected - logits(base, x)).abs().max() > 1e-3
    torch.testing.assert_close(peft_logits(base, tmp_path, x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(slimtune.load_adapter(clone(base), tmp_path), x), expected, atol=0, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lora", "vera", "ia3"])
def test_slimtune_loads_what_peft_saves(arch, method, tmp_path):
    base = tiny(arch).requires_grad_(False)
    ia3 = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]), "qwen2": (["k_proj", "v_proj", "down_proj"],
           ["down_proj"]), "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])}[arch]
    config = {"lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "c_attn", "c_fc"]
                                      if arch != "gpt2" else ["c_attn", "c_fc"]),
              "vera": peft.VeraConfig(r=8, target_modules="all-linear", projection_prng_key=7),
              "ia3": peft.IA3Config(target_modules=ia3[0], feedforward_modules=ia3[1])}[method]
    if method == "lora" and arch != "gpt2":
        config.target_modules = ["q_proj", "v_proj", "gate_proj"]
    theirs = peft.get_peft_model(clone(base), config)
    g = torch.Generator().manual_seed(4)
    for name, p in theirs.named_parameters():
        if p.requires_grad:  # random, non-zero: identity init off
            p.copy_(p + 0.1 * torch.randn(p.shape, generator=g) if name.endswith(("ia3_l.default", "lambda_d.default",
                                                                             "lambda_b.default")) else
                    0.1 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(tmp_path)
    x = batch(base)
    expected = logits(theirs.eval(), x)
    assert (expected - logits(base, x)).abs().max() > 1e-3
    ours = slimtune.load_adapter(clone(base), tmp_path)
    torch.testing.assert_close(logits(ours, x), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", LOWRANK)
def test_each_exported_plain_lora_loaded_by_peft_equals_slimtune(arch, method, tmp_path):
    base, model = adapted(arch, method)
    x = batch(base)
    expected = logits(model, x)
    slimtune.export_peft_lora(model, tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == model.slimtune_adapters.roots["default"].config.r
    torch.testing.assert_close(peft_logits(base, tmp_path, x), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lora", "vera", "tied-lora", "ia3"])
def test_the_merged_export_loads_in_plain_transformers(arch, method, tmp_path):
    from slimtune.cli import main

    base, model = adapted(arch, method)
    base.save_pretrained(tmp_path / "base")
    slimtune.save_adapter(model, tmp_path / "adapter")
    assert main(["export", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    x = batch(base)
    torch.testing.assert_close(logits(plain, x), logits(model.eval(), x), atol=1e-5, rtol=1e-5)


def test_export_through_the_cli_and_its_errors(tmp_path, capsys):
    from slimtune.cli import main

    base, model = adapted("llama", "tied-lora")
    base.save_pretrained(tmp_path / "base")
    slimtune.save_adapter(model, tmp_path / "adapter")
    args = ["export", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out"]
    assert main(args + [str(tmp_path / "lora")]) == 0
    x = batch(base)
    torch.testing.assert_close(peft_logits(base, tmp_path / "lora", x), logits(model, x), atol=1e-5, rtol=1e-5)
    assert main(args + [str(tmp_path / "p"), "--format", "peft"]) == 2
    assert "PEFT has no adapter type" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(args + [str(tmp_path / "file")]) == 2
    assert "it is a file, not a directory" in capsys.readouterr().err
    _, ia3 = adapted("llama", "ia3")
    with pytest.raises(slimtune.SlimtuneError, match="not a low-rank adapter"):
        slimtune.export_peft_lora(ia3, tmp_path / "ia3")


@pytest.mark.parametrize("method", ["lora", "vera", "tied-lora", "ia3"])
def test_adapters_saved_by_slimtune_0_1_still_load(method, tmp_path):
    """slimtune 0.1 wrote every adapter in its own format: the config under "format":
    "slimtune-adapter" and the tensors under slimtune's keys, with no header metadata."""
    base, model = adapted("llama", method)
    cfg = to_dict(slimtune.get_config(model))
    cfg.pop("rslora", None)  # 0.1 had no such field
    (tmp_path / "adapter_config.json").write_text(json.dumps({"format": "slimtune-adapter", "slimtune_version": "0.1.0",
                                                              "config": cfg, "base_model": fingerprint(model)}))
    save_file({k: v.detach().contiguous() for k, v in adapter_state_dict(model).items()},
              str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    x = batch(base)
    assert torch.equal(logits(slimtune.load_adapter(clone(base), tmp_path), x), logits(model, x))


def test_a_failed_load_leaves_the_model_as_it_was(tmp_path):
    """A wrong-shaped or corrupt adapter is refused with nothing injected; the right one then
    loads as into a fresh model."""
    base, good = adapted("llama", "lora")
    slimtune.save_adapter(good, tmp_path / "good")
    _, wrong = adapted("llama", "lora", r=4)
    slimtune.save_adapter(wrong, tmp_path / "wrong")
    tensors = slimtune.formats.files.read_tensors(tmp_path / "wrong" / "adapter_model.safetensors")[0]
    conf = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "adapter_config.json").write_text(json.dumps(conf))  # says r = 8, holds r = 4
    save_file(tensors, str(tmp_path / "mixed" / "adapter_model.safetensors"))
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "adapter_config.json").write_text(json.dumps(conf))
    data = (tmp_path / "good" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "cut" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    model = clone(base)
    model.lm_head.weight.requires_grad_(True)  # a user's choice, which a failed load must not undo
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for bad, words in (("mixed", "expected \\(8, 32\\)"), ("cut", "truncated")):
        with pytest.raises(slimtune.SlimtuneError, match=words):
            slimtune.load_adapter(model, tmp_path / bad)
        assert not slimtune.adapter_names(model) and model.state_dict().keys() == state.keys()
        assert model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    x = batch(base)
    assert torch.equal(logits(slimtune.load_adapter(model, tmp_path / "good"), x), logits(good, x))


def test_non_finite_tensors_are_refused_when_saved_and_when_loaded(tmp_path):
    base, model = adapted("llama", "tied-lora")
    slimtune.save_adapter(model, tmp_path)
    slimtune.save_adapter(model, tmp_path / "good")
    with torch.no_grad():
        next(iter(slimtune.trainable_parameters(model).values()))[0] = float("nan")
    with pytest.raises(slimtune.SlimtuneError, match="inf or NaN.*nothing was written"):
        slimtune.save_adapter(model, tmp_path / "nan")
    assert not (tmp_path / "nan" / "adapter_model.safetensors").exists()
    with pytest.raises(slimtune.SlimtuneError, match="inf or NaN"):
        slimtune.merged_state_dict(model)
    tensors = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))  # the file on disk now holds the NaN
    with pytest.raises(slimtune.SlimtuneError, match="holds inf or NaN"):
        slimtune.load_adapter(clone(base), tmp_path)
    conf = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    conf["config"]["alpha"] = float("nan")
    (tmp_path / "good" / "adapter_config.json").write_text(json.dumps(conf))  # NaN, as JSON writers spell it
    with pytest.raises(slimtune.SlimtuneError, match="alpha=nan: not a finite number"):
        slimtune.load_adapter(clone(base), tmp_path / "good")
