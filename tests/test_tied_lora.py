"""Tied-LoRA against an independent reference written here: W0 + diag(v_l) B_k diag(u_l) A_k per
layer l of kind k, with one A_k and one B_k per kind shared by every layer, put on a plain
transformers model with forward hooks. PEFT has no Tied-LoRA, so this is its outside check.
The two are compared before and after an SGD step: an adapter that did not tie its A and B
across layers would give each layer its own gradient step and leave the reference."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch, clone, layers, logits, perturb, tiny

import slimtune
from slimtune.models.layers import kind


class Reference:
    """Tied-LoRA by hand: hooks add x (diag(v) B diag(u) A)ᵀ to each target's output."""

    def __init__(self, base, sites: dict, share_a: str):
        self.model = clone(base)
        self.A, self.B, self.u, self.v = {}, {}, {}, {}
        for name, site in sites.items():  # the values the adapter starts from, one pair per kind
            A, B, d, b = (None if t is None else t.detach().clone() for t in site.parts())
            k = kind(name)
            ka = "model" if share_a == "model" else k
            self.A.setdefault(ka, A.requires_grad_())
            self.B.setdefault(k, B.requires_grad_())
            self.u[name] = None if d is None else d.requires_grad_()
            self.v[name] = None if b is None else b.requires_grad_()
            layer = self.model.get_submodule(name)
            layer.register_forward_hook(self.hook(name, ka, k, site.in_features, site.out_features))

    def hook(self, name, ka, k, i, o):
        def add(module, inputs, out):
            A, B = self.A[ka][:, :i], self.B[k][:o]
            u = self.u[name] if self.u[name] is not None else torch.ones(A.shape[0])
            v = self.v[name] if self.v[name] is not None else torch.ones(o)
            return out + inputs[0] @ (v[:, None] * B @ (u[:, None] * A)).T
        return add

    def params(self):
        return [t for t in [*self.A.values(), *self.B.values(), *self.u.values(), *self.v.values()] if t is not None]


@pytest.mark.parametrize("method", ["tied-lora", "tied-lora-ba", "tied-lora-paper"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tied_lora_equals_the_formula_written_out_per_layer(arch, method):
    base = tiny(arch).requires_grad_(False)
    model = slimtune.add_adapter(clone(base), slimtune.preset(method))
    perturb(model)
    ref = Reference(base, layers(model), share_a=model.slimtune_adapters.roots["default"].config.A.share)
    x = batch(base)
    target = torch.randint(0, 64, x["input_ids"].shape, generator=torch.Generator().manual_seed(1))
    for step in range(2):
        ours, theirs = logits(model, x), logits(ref.model, x)
        assert (theirs - logits(base, x)).abs().max() > 1e-3
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=f"after {step} steps")
        if step == 0:
            for out, params in ((ours, slimtune.trainable_parameters(model).values()), (theirs, ref.params())):
                loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), target.flatten())
                grads = torch.autograd.grad(loss, list(params))
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p -= 1.0 * g


def test_tied_lora_paper_count_reproduces_the_paper():
    """vBuA on the fused QKV of Llama-2-7B: 4dr + L(r + 3d) (the paper's 12.5 % of LoRA there)."""
    from slimtune.cli import main

    d, L, r = 4096, 32, 8
    model = slimtune.build_on_meta("llama-2-7b")
    slimtune.add_adapter(model, slimtune.preset("tied-lora-paper", r=r))
    assert slimtune.count_parameters(model).trainable == 4 * d * r + L * (r + 3 * d)
    lora = slimtune.add_adapter(slimtune.build_on_meta("llama-2-7b"), slimtune.preset("lora", r=r, targets=
                                                                                    ["q_proj", "k_proj", "v_proj"]))
    assert 4 * d * r + L * (r + 3 * d) < 0.13 * slimtune.count_parameters(lora).trainable
    assert main(["params", "--model", "llama-2-7b", "--method", "tied-lora-paper", "--json"]) == 0


def test_the_paper_preset_ties_one_pair_across_all_layers():
    model = slimtune.add_adapter(tiny("llama"), slimtune.preset("tied-lora-paper"))
    root = model.slimtune_adapters.roots["default"]
    assert sorted(n.rsplit(".", 1)[1] for n in layers(model)) == ["k_proj", "k_proj", "q_proj", "q_proj",
                                                                  "v_proj", "v_proj"]
    assert sorted(root.adapter_params()) == ["A__model", "B__model_layers_N_self_attn_k_proj",
                                             "B__model_layers_N_self_attn_q_proj", "B__model_layers_N_self_attn_v_proj",
                                             "d__model_layers_0", "d__model_layers_1"]
    assert json.dumps(slimtune.configs.to_dict(slimtune.get_config(model)))  # its config is plain data
