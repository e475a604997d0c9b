"""Given the same weights, slimtune and Hugging Face PEFT give the same logits."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import batch, clone, logits, perturb, tiny

import slimtune
from slimtune.ops import adapter_layers


def _pair(method: str, peft_config, **overrides):
    base = tiny("llama").requires_grad_(False)
    ours = slimtune.add_adapter(clone(base), slimtune.preset(method, **overrides))
    perturb(ours)
    theirs = peft.get_peft_model(clone(base), peft_config)
    return base, ours, theirs


def _peft_layer(theirs, name):
    return theirs.base_model.model.get_submodule(name)


@torch.no_grad()
def _check(base, ours, theirs):
    x = batch(base)
    expected = logits(theirs, x)
    assert (expected - logits(base, x)).abs().max() > 1e-3  # the adapters really act
    torch.testing.assert_close(logits(ours, x), expected, atol=1e-5, rtol=1e-5)


def test_lora_matches_peft():
    base, ours, theirs = _pair("lora", peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    layers = dict(adapter_layers(ours))
    assert len(layers) == 14
    with torch.no_grad():
        for name, layer in layers.items():
            target = _peft_layer(theirs, name)
            target.lora_A["default"].weight.copy_(layer.A)
            target.lora_B["default"].weight.copy_(layer.B)
    _check(base, ours, theirs)


def test_vera_matches_peft_from_the_same_seed():
    # Only the trained vectors are copied: the frozen random pair must come out of the seed the same.
    base, ours, theirs = _pair("vera", peft.VeraConfig(r=16, target_modules="all-linear", projection_prng_key=0,
                                                        d_initial=0.1), r=16, seed=0)
    shared = ours.slimtune_shared
    assert torch.equal(shared.A__model, theirs.base_model.vera_A["default"])
    assert torch.equal(shared.B__model, theirs.base_model.vera_B["default"])
    with torch.no_grad():
        for name, layer in adapter_layers(ours):
            target = _peft_layer(theirs, name)
            target.vera_lambda_d["default"].copy_(layer.d)
            target.vera_lambda_b["default"].copy_(layer.b)
    _check(base, ours, theirs)


def test_vera_init_matches_peft_init():
    base, ours, theirs = _pair("vera", peft.VeraConfig(r=16, target_modules="all-linear"), r=16)
    fresh = slimtune.add_adapter(clone(base), slimtune.preset("vera", r=16))
    for name, layer in adapter_layers(fresh):
        torch.testing.assert_close(layer.d.detach(), _peft_layer(theirs, name).vera_lambda_d["default"].detach())
        torch.testing.assert_close(layer.b.detach(), _peft_layer(theirs, name).vera_lambda_b["default"].detach())


def test_ia3_matches_peft():
    cfg = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    base, ours, theirs = _pair("ia3", cfg)
    layers = dict(adapter_layers(ours))
    assert sorted({n.rsplit(".", 1)[1] for n in layers}) == ["down_proj", "k_proj", "v_proj"]
    with torch.no_grad():
        for name, layer in layers.items():
            target = _peft_layer(theirs, name).ia3_l["default"]
            target.copy_(layer.l.reshape(target.shape))
    _check(base, ours, theirs)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_trainable_counts_match_peft(method):
    cfgs = {"lora": peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
            "ia3": peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])}
    base, ours, theirs = _pair(method, cfgs[method])
    trainable, _ = theirs.get_nb_trainable_parameters()
    assert slimtune.count_parameters(ours).trainable == trainable
