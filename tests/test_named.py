"""Named adapters: several on one model, added, loaded, activated, disabled, saved and deleted
by name. The reference for each is the same adapter alone on a fresh copy of the base."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, clone, layers, logits, perturb, tiny

import slimtune
from slimtune.adapters.protocol import AdapterHost


def _two(arch: str = "llama"):
    """A base, and a model carrying LoRA "a" and VeRA "b", each perturbed, with the models that
    carry each one alone (the same values)."""
    base = tiny(arch).requires_grad_(False)
    lora = slimtune.add_adapter(clone(base), slimtune.preset("lora"))
    vera = slimtune.add_adapter(clone(base), slimtune.preset("vera", r=16))
    perturb(lora, seed=1), perturb(vera, seed=2)
    both = slimtune.add_adapter(clone(base), slimtune.preset("lora"), name="a")
    slimtune.add_adapter(both, slimtune.preset("vera", r=16), name="b")
    with torch.no_grad():
        for name, alone in (("a", lora), ("b", vera)):
            mine = slimtune.trainable_parameters(both, name)
            for k, v in slimtune.trainable_parameters(alone).items():
                mine[k].copy_(v)
    return base, lora, vera, both


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_named_adapter_computes_as_it_would_alone(arch):
    base, lora, vera, both = _two(arch)
    x = batch(base)
    assert slimtune.adapter_names(both) == ["a", "b"] and slimtune.active_adapter(both) == "a"
    torch.testing.assert_close(logits(both, x), logits(lora, x), atol=1e-6, rtol=0)
    slimtune.set_active_adapter(both, "b")
    torch.testing.assert_close(logits(both, x), logits(vera, x), atol=1e-6, rtol=0)
    with slimtune.disable_adapters(both):
        torch.testing.assert_close(logits(both, x), logits(base, x), atol=1e-6, rtol=0)
    slimtune.set_active_adapter(both, None)
    torch.testing.assert_close(logits(both, x), logits(base, x), atol=1e-6, rtol=0)
    host = both.get_submodule(next(iter(layers(both, "a"))))
    assert isinstance(host, AdapterHost) and set(host.adapters) == {"a", "b"}  # one host, two adapters


def test_training_takes_the_active_adapter_only():
    _, _, _, both = _two()
    slimtune.set_active_adapter(both, "b")
    params = slimtune.set_trainable(both)
    assert {id(p) for p in params} == {id(p) for p in slimtune.trainable_parameters(both, "b").values()}
    assert all(not p.requires_grad for p in slimtune.trainable_parameters(both, "a").values())
    assert slimtune.count_parameters(both).trainable == slimtune.count_parameters(both, "b").trainable
    base_count = sum(p.numel() for p in tiny("llama").parameters())
    assert slimtune.count_parameters(both).base == base_count  # other adapters are not the base


def test_save_and_load_by_name(tmp_path):
    base, lora, vera, both = _two()
    x = batch(base)
    slimtune.save_adapter(both, tmp_path / "b", name="b")
    slimtune.save_adapter(both, tmp_path / "a", name="a")
    model = slimtune.load_adapter(clone(base), tmp_path / "a", name="first")
    slimtune.load_adapter(model, tmp_path / "b", name="second")
    assert slimtune.adapter_names(model) == ["first", "second"]
    assert torch.equal(logits(model, x), logits(lora, x))
    slimtune.set_active_adapter(model, "second")
    assert torch.equal(logits(model, x), logits(vera, x))
    with pytest.raises(slimtune.SlimtuneError, match="already carries an adapter of that name"):
        slimtune.load_adapter(model, tmp_path / "a", name="first")


def test_delete_gives_the_base_modules_back():
    base, lora, vera, both = _two()
    x = batch(base)
    slimtune.delete_adapter(both, "a")
    assert slimtune.active_adapter(both) is None and slimtune.adapter_names(both) == ["b"]
    slimtune.set_active_adapter(both, "b")
    torch.testing.assert_close(logits(both, x), logits(vera, x), atol=1e-6, rtol=0)
    slimtune.delete_adapter(both, "b")
    assert not any(isinstance(m, AdapterHost) for m in both.modules()) and not hasattr(both, "slimtune_adapters")
    assert both.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(logits(both, x), logits(base, x), atol=0, rtol=0)


def test_two_adapters_on_one_layer_of_different_methods():
    """(IA)3 scales k_proj's output and LoRA adds to it: one host, each computed alone."""
    base = tiny("llama").requires_grad_(False)
    model = slimtune.add_adapter(clone(base), slimtune.preset("ia3"), name="ia3")
    slimtune.add_adapter(model, slimtune.preset("lora", targets=["k_proj"]), name="lora")
    perturb(model)  # the active one: (IA)3
    slimtune.set_active_adapter(model, "lora")
    perturb(model, seed=5)
    x = batch(base)
    for name in ("ia3", "lora"):
        alone = slimtune.add_adapter(clone(base), slimtune.get_config(model, name))
        with torch.no_grad():
            mine = slimtune.trainable_parameters(alone)
            for k, v in slimtune.trainable_parameters(model, name).items():
                mine[k].copy_(v)
        slimtune.set_active_adapter(model, name)
        torch.testing.assert_close(logits(model, x), logits(alone, x), atol=1e-6, rtol=0)


def test_merged_adapter_blocks_switching_until_unmerged():
    base, lora, _, both = _two()
    x = batch(base)
    slimtune.merge_adapters(both)
    torch.testing.assert_close(logits(both, x), logits(lora, x), atol=1e-5, rtol=0)
    with pytest.raises(slimtune.SlimtuneError, match="unmerge_adapters"):
        slimtune.set_active_adapter(both, "b")
    with pytest.raises(slimtune.SlimtuneError, match="unmerge_adapters"):
        slimtune.delete_adapter(both, "a")
    slimtune.unmerge_adapters(both)
    slimtune.set_active_adapter(both, "b")
    slimtune.delete_adapter(both, "a")


def test_unknown_names_are_errors():
    _, _, _, both = _two()
    for call in (lambda: slimtune.set_active_adapter(both, "c"), lambda: slimtune.delete_adapter(both, "c"),
                 lambda: slimtune.get_config(both, "c")):
        with pytest.raises(slimtune.SlimtuneError, match=r"adapter 'c': the model carries \['a', 'b'\]"):
            call()
