"""Sibling layers sharing one down-projection (adapters/siblings.py).

The reference is the same model's first forward, where no group is known yet and every layer
computes its own a = x Aᵀ (the path the property matrix, gradcheck and PEFT parity cover).
"""

from __future__ import annotations

import pytest
import torch
from conftest import batch, clone, layers, logits, perturb, split_tokens, tiny, tiny_preset

import slimtune
from slimtune.adapters.fast import blas
from slimtune.adapters.fast.fused import LowRankDown, PerTokenLowRank
from slimtune.adapters.fast.layer import FastLayer, siblings_of

LOWRANK = ["lora", "vera", "tied-lora", "tied-lora-ba"]
# Which layers read the same input, by architecture, for 2 blocks (T5: 2 encoder, 2 decoder).
# GPT-2's c_attn is already one layer; T5's cross-attention q reads the decoder, k and v the encoder.
EXPECTED = {
    "llama": [{"q_proj", "k_proj", "v_proj"}] * 2 + [{"gate_proj", "up_proj"}] * 2,
    "t5": [{"q", "k", "v"}] * 4 + [{"k", "v"}] * 2 + [{"wi_0", "wi_1"}] * 4,
    "gpt2": [],
}


def siblings(model):
    return siblings_of(next(iter(layers(model).values())))


def groups(model) -> list[set[str]]:
    names = {id(FastLayer.of(m)): n.rsplit(".", 1)[-1] for n, m in layers(model).items()}
    found = {id(g): g for g in siblings(model).group_of.values()}
    return [{names[id(m)] for m in g} for g in found.values()]


def step(model, inputs):
    for p in model.parameters():
        p.grad = None
    out = logits(model, inputs)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in slimtune.trainable_parameters(model).items()}


class Spy:
    """Counts the shared products and the columns they compute."""

    def __init__(self, monkeypatch):
        self.calls, self.rows = 0, 0
        apply = LowRankDown.apply

        def counted(x2, A):
            self.calls, self.rows = self.calls + 1, self.rows + A.shape[0]
            return apply(x2, A)
        monkeypatch.setattr(LowRankDown, "apply", counted)


@pytest.mark.parametrize("method", LOWRANK)
@pytest.mark.parametrize("arch", ["llama", "t5", "gpt2"])
def test_shared_down_projection_equals_each_layers_own(arch, method, monkeypatch):
    base = tiny(arch).requires_grad_(False)
    model = slimtune.add_adapter(clone(base), tiny_preset(method))
    perturb(model)
    x = batch(base)
    spy = Spy(monkeypatch)
    out0, grads0 = step(model, x)  # learns the groups; every layer computes its own a
    assert spy.calls == 0
    found = groups(model)
    assert sorted(map(sorted, found)) == sorted(map(sorted, EXPECTED[arch]))
    out1, grads1 = step(model, x)
    if EXPECTED[arch]:
        assert spy.calls > 0  # the second forward really took the shared path
    torch.testing.assert_close(out1, out0, atol=1e-5, rtol=0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert not siblings(model)._shared  # every member took its a: nothing held past the forward


def test_one_A_for_the_group_is_stacked_once(monkeypatch):
    """VeRA's layers use the same frozen A: the group computes x Aᵀ once (r rows, not 3r)."""
    model = slimtune.add_adapter(tiny("llama"), slimtune.preset("vera", r=4))  # r = 4: per token on tiny layers
    x = batch(model)
    logits(model, x)
    spy = Spy(monkeypatch)
    logits(model, x)
    assert spy.calls == 2 * 2 and spy.rows == spy.calls * 4  # q/k/v and gate/up in 2 blocks, one A each
    lora = slimtune.add_adapter(tiny("llama"), slimtune.preset("lora", r=4))
    logits(lora, x)
    spy = Spy(monkeypatch)
    logits(lora, x)
    assert spy.calls == 2 * 2 and spy.rows == 2 * (3 * 4 + 2 * 4)  # LoRA: each layer's own A, stacked


def test_a_member_called_with_another_input_computes_its_own():
    """A group is a plan: when a member's input is not the group's, the result is still right."""
    base = tiny("llama").requires_grad_(False)
    model = slimtune.add_adapter(clone(base), tiny_preset("lora"))
    perturb(model)
    x = batch(base)
    out0, grads0 = step(model, x)
    attn = model.model.layers[0].self_attn
    q, o = (FastLayer.of(m.adapters["default"]) for m in (attn.q_proj, attn.o_proj))
    wrong = (q, o)  # o reads the attention's output, not q's input
    sib = siblings(model)
    sib.group_of[id(q)] = sib.group_of[id(o)] = wrong
    out1, grads1 = step(model, x)
    torch.testing.assert_close(out1, out0, atol=1e-5, rtol=0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_groups_survive_no_copy_and_dropout_turns_sharing_off(monkeypatch):
    model = slimtune.add_adapter(tiny("llama"), slimtune.preset("lora", dropout=0.1))
    x = batch(model)
    logits(model, x)
    copy = clone(model)  # a copy learns its own groups: none are carried over
    assert siblings(copy) is not siblings(model) and not siblings(copy).group_of
    model.train()  # dropout draws a mask per layer: no two layers read the same input
    spy = Spy(monkeypatch)
    logits(model, x)
    logits(model, x)
    assert spy.calls == 0


@pytest.mark.parametrize("skinny", [True, False])
@pytest.mark.parametrize("with_vectors", [True, False])
@pytest.mark.parametrize("split", [True, False])
def test_per_token_function_with_a_given_gradients(skinny, with_vectors, split, monkeypatch):
    """PerTokenLowRank fed a = x Aᵀ from LowRankDown, against numerical gradients (float64),
    with the products split over tokens (adapters/blas.py) or not."""
    monkeypatch.setattr(blas, "SKINNY_R", 100 if skinny else 1)
    split_tokens(monkeypatch, split)
    g = torch.Generator().manual_seed(0)
    n, i, o, r = 5, 6, 4, 3

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
    x, W0, bias, A, B = t(2, n, i), t(o, i).detach(), t(o).detach(), t(r, i), t(o, r)
    d, b = (t(r), t(o)) if with_vectors else (None, None)

    def f(x, A, B, d, b):
        a = LowRankDown.apply(x.reshape(-1, i), A)  # (N, r)
        return PerTokenLowRank.apply(x, None, W0, bias, None, B, d, b, 0.7, a)
    assert torch.autograd.gradcheck(f, (x, A, B, d, b))


def test_siblings_with_one_A_choose_their_form_together():
    """VeRA r = 12 on 24 tokens: alone, each of q, k, v would find a dense form cheaper; a
    group computes a = x Aᵀ once, so it compares the members' summed costs with that work split
    among them, and every member takes the same form (here per token)."""
    model = slimtune.add_adapter(tiny("llama"), slimtune.preset("vera", r=12))
    x = batch(model, T=24)
    logits(model, x)  # learn the groups
    sites = layers(model)
    qkv = [FastLayer.of(sites[f"model.layers.0.self_attn.{n}_proj"]) for n in "qkv"]
    assert all(m.same_a() == tuple(qkv) for m in qkv)
    h = torch.randn(1, 24, qkv[0].i)
    trains = qkv[0].trained(qkv[0].site.parts())
    costs = [m.flops(24, True, trains, sharing=3) for m in qkv]
    total = {f: sum(c[f] for c in costs) for f in costs[0]}
    together = min(total, key=total.get)
    assert [m.form(h, m.site.parts()) for m in qkv] == [together] * 3
    own = [m.flops(24, True, trains) for m in qkv]
    assert [min(c, key=c.get) for c in own] != [together] * 3  # the case where choosing together matters


@pytest.mark.parametrize("method", ["lora", "vera", "tied-lora"])
def test_torch_compile_traces_the_adapter_once_and_matches_eager(method):
    """Under torch.compile sibling sharing is off (compile fuses by itself): the adapted model
    compiles to a couple of frames, not one recompile per layer, and equals eager."""
    import torch._dynamo
    import torch._dynamo.testing

    base = tiny("llama").requires_grad_(False)
    eager = slimtune.add_adapter(clone(base), tiny_preset(method))
    perturb(eager)
    traced = clone(eager)
    x = batch(eager)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")  # traces, no codegen
    compiled = torch.compile(traced, backend=counter)
    for model, fn in ((eager, eager), (traced, compiled)):
        fn(**x)
        (fn(**x).logits ** 2).mean().backward()
    assert counter.frame_count <= 3  # one per layer (50+) before sharing stepped aside
    torch.testing.assert_close(compiled(**x).logits, eager(**x).logits, rtol=1e-5, atol=1e-6)
    for (k, p), q in zip(slimtune.trainable_parameters(eager).items(), slimtune.trainable_parameters(traced).values()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=k)
    torch._dynamo.reset()
