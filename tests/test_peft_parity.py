"""Given the same weights, slimtune and Hugging Face PEFT give the same logits: LoRA, VeRA and
(IA)³ on Llama, Qwen2 (biases on q, k, v), GPT-2 (Conv1D, fused c_attn) and T5, with every
adapter tensor random and non-zero. The weights are copied into PEFT's layers by this test,
from the formula's definitions, never through slimtune's own export."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import batch, clone, layers, logits, perturb, shared, tiny

import slimtune

ARCHS = ["llama", "qwen2", "gpt2", "t5"]
IA3_TARGETS = {  # (targets, feed-forward targets) as PEFT names them
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]), "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]), "t5": (["k", "v", "wo"], ["wo"]),
}


def _peft_layer(theirs, name):
    return theirs.base_model.model.get_submodule(name)


def _pair(arch, method, peft_config, **overrides):
    base = tiny(arch).requires_grad_(False)
    ours = slimtune.add_adapter(clone(base), slimtune.preset(method, **overrides))
    perturb(ours)
    theirs = peft.get_peft_model(clone(base), peft_config)
    return base, ours, theirs


@torch.no_grad()
def _check(base, ours, theirs):
    x = batch(base)
    expected = logits(theirs, x)
    assert (expected - logits(base, x)).abs().max() > 1e-3  # the adapters really act
    torch.testing.assert_close(logits(ours, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_matches_peft(arch):
    base, ours, theirs = _pair(arch, "lora", peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    sites = layers(ours)
    assert len(sites) == len([m for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)])
    with torch.no_grad():
        for name, site in sites.items():
            target = _peft_layer(theirs, name)
            target.lora_A["default"].weight.copy_(site.A)
            target.lora_B["default"].weight.copy_(site.B)
    _check(base, ours, theirs)


@pytest.mark.parametrize("arch", ARCHS)
def test_vera_matches_peft_from_the_same_seed(arch):
    # Only the trained vectors are copied: the frozen random pair must come out of the seed the same.
    base, ours, theirs = _pair(arch, "vera", peft.VeraConfig(r=16, target_modules="all-linear", projection_prng_key=3,
                                                              d_initial=0.1), r=16, seed=3)
    root = shared(ours)
    assert torch.equal(root.A__model, theirs.base_model.vera_A["default"])
    assert torch.equal(root.B__model, theirs.base_model.vera_B["default"])
    with torch.no_grad():
        for name, site in layers(ours).items():
            target = _peft_layer(theirs, name)
            target.vera_lambda_d["default"].copy_(site.d)
            target.vera_lambda_b["default"].copy_(site.b)
    _check(base, ours, theirs)
    assert slimtune.count_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_ia3_matches_peft(arch):
    """PEFT scales all of GPT-2's fused c_attn; slimtune only its k and v thirds, as the paper
    does. So PEFT's vector is built here as ones on the q third and slimtune's l on the rest:
    scaling the wrong thirds would not match."""
    targets, ff = IA3_TARGETS[arch]
    base, ours, theirs = _pair(arch, "ia3", peft.IA3Config(target_modules=targets, feedforward_modules=ff))
    sites = layers(ours)
    assert len(sites) == len([m for m in theirs.modules() if isinstance(m, peft.tuners.ia3.IA3Layer)])
    with torch.no_grad():
        for name, site in sites.items():
            target = _peft_layer(theirs, name).ia3_l["default"]
            l = site.l
            if name.endswith("attn.c_attn"):
                hidden = base.config.n_embd
                assert l.numel() == 2 * hidden  # k and v only
                l = torch.cat([torch.ones(hidden), l])  # q, k, v: the q third untouched
            target.copy_(l.reshape(target.shape))
    _check(base, ours, theirs)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lora", "vera", "ia3"])
def test_trainable_counts_match_peft(arch, method):
    targets, ff = IA3_TARGETS[arch]
    cfgs = {"lora": peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
            "vera": peft.VeraConfig(r=16, target_modules="all-linear"),
            "ia3": peft.IA3Config(target_modules=targets, feedforward_modules=ff)}
    base, ours, theirs = _pair(arch, method, cfgs[method], **({"r": 16} if method == "vera" else {}))
    trainable, _ = theirs.get_nb_trainable_parameters()
    if method == "ia3" and arch == "gpt2":  # PEFT's c_attn vector also spans the q third: hidden per layer
        trainable -= base.config.n_embd * base.config.n_layer
    assert slimtune.count_parameters(ours).trainable == trainable


@torch.no_grad()
def test_gpt2_ia3_against_gpt2_rewritten_by_hand():
    """A second check of GPT-2's (IA)³, independent of PEFT and of slimtune's merge: the paper's
    l_k ⊙ k, l_v ⊙ v and W_down (l_ff ⊙ h) written into a copy of GPT-2's own weights. c_attn is
    a Conv1D, y = x W + b with W (in, 3d) split into q | k | v columns (GPT2Attention splits its
    output so); only the k and v columns may change. mlp.c_proj's rows take l_ff."""
    import copy

    from conftest import ARCHS

    torch.manual_seed(0)
    base = ARCHS["gpt2"]().eval()
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.preset("ia3"))
    g = torch.Generator().manual_seed(1)
    for t in slimtune.trainable_parameters(model).values():
        t.copy_(1 + 0.5 * torch.randn(t.shape, generator=g))
    vectors = {n: t.detach() for n, t in slimtune.trainable_parameters(model).items()}
    d = base.config.n_embd
    by_hand = copy.deepcopy(base)
    for i, block in enumerate(by_hand.transformer.h):
        l_kv = vectors[f"transformer.h.{i}.attn.c_attn.l"]  # (2d,): l_k then l_v
        l_ff = vectors[f"transformer.h.{i}.mlp.c_proj.l"]  # (4d,)
        assert l_kv.shape == (2 * d,) and l_ff.shape == (4 * d,)
        block.attn.c_attn.weight[:, d:] *= l_kv  # the k and v columns; q (the first d) untouched
        block.attn.c_attn.bias[d:] *= l_kv
        block.mlp.c_proj.weight *= l_ff[:, None]  # W_down (l_ff ⊙ h): the rows of (in, out)
    ids = torch.randint(0, base.config.vocab_size, (2, 9), generator=g)
    want = by_hand(ids).logits
    torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base(ids).logits, want, atol=1e-3)  # the vectors do change the output
