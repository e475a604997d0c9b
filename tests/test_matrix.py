"""The property matrix: every method x every tiny architecture, on the fast path and on the
reference formula (`path`).

Identity init is switched off (`perturb`) wherever a check could otherwise pass because the
adapter does nothing at init.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import MIXTURES, batch, clone, layers, logits, perturb, shared, split_tokens, tiny, tiny_preset

import slimtune
from slimtune.adapters import fast
from slimtune.adapters.fast.layer import FastLayer
from slimtune.adapters.protocol import AdapterHost


def adapted(arch, method, identity: bool = False):
    base = tiny(arch).requires_grad_(False)  # frozen like the adapted model: same kernels
    model = slimtune.add_adapter(clone(base), tiny_preset(method))
    if not identity:
        perturb(model)
    return base, model


def test_init_equals_base(arch, method, path):
    base, model = adapted(arch, method, identity=True)
    x = batch(base)
    # a mixture's weights sum to 1 within a rounding: MoV's l = p V with V = 1 is 1 ± 1 ulp
    rtol = 1e-6 if method in MIXTURES else 0
    torch.testing.assert_close(logits(model, x), logits(base, x), atol=1e-6, rtol=rtol)


def test_adapter_changes_output_once_perturbed(arch, method, path):
    # guards every other check against an adapter that silently does nothing
    base, model = adapted(arch, method)
    x = batch(base)
    assert (logits(model, x) - logits(base, x)).abs().max() > 1e-3


def test_disabled_equals_base(arch, method, path):
    base, model = adapted(arch, method)
    x = batch(base)
    with slimtune.disable_adapters(model):
        torch.testing.assert_close(logits(model, x), logits(base, x), atol=1e-6, rtol=0)
    assert (logits(model, x) - logits(base, x)).abs().max() > 1e-3  # re-enabled on exit


def test_adapted_model_moves_with_to(arch, method, path):
    base, model = adapted(arch, method)
    x = batch(base)
    before = logits(model, x)
    model.to(torch.float64)  # adapter layers, shared tensors and base weights all follow
    torch.testing.assert_close(logits(model, x).float(), before, atol=1e-4, rtol=1e-4)


def refused_if_it_cannot_merge(model, method) -> bool:
    """A mixture cannot be folded into weights: every merge is refused, naming the method."""
    if method not in MIXTURES:
        return False
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for fold in (slimtune.merge_adapters, slimtune.merged_state_dict, slimtune.merge_and_unload):
        with pytest.raises(slimtune.SlimtuneError, match=f"adapter {method} .*does not fold into the base weights"):
            fold(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return True


@torch.no_grad()
def test_merged_equals_unmerged(arch, method, path):
    base, model = adapted(arch, method)
    if refused_if_it_cannot_merge(model, method):
        return
    x = batch(base)
    before = logits(model, x)
    slimtune.merge_adapters(model)
    slimtune.merge_adapters(model)  # merging twice is harmless
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
    with slimtune.disable_adapters(model):  # disabling a merged model gives the base back
        torch.testing.assert_close(logits(model, x), logits(base, x), atol=1e-5, rtol=0)
    slimtune.unmerge_adapters(model)
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
    with slimtune.disable_adapters(model):
        torch.testing.assert_close(logits(model, x), logits(base, x), atol=1e-5, rtol=0)


@torch.no_grad()
def test_merged_state_dict_is_pure_and_loads_into_base(arch, method, path):
    base, model = adapted(arch, method)
    if refused_if_it_cannot_merge(model, method):
        return
    x = batch(base)
    logits(model, x)  # the first forward learns which layers share an input (siblings.py)
    expected = logits(model, x)
    sd = slimtune.merged_state_dict(model)
    assert set(sd) == set(base.state_dict())
    torch.testing.assert_close(logits(model, x), expected, atol=0, rtol=0)  # model untouched
    plain = clone(base)
    plain.load_state_dict(sd)
    torch.testing.assert_close(logits(plain, x), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_merge_and_unload_leaves_the_plain_base_with_the_merged_weights(arch, method, path):
    base, model = adapted(arch, method)
    if refused_if_it_cannot_merge(model, method):
        return
    x = batch(base)
    expected, merged = logits(model, x), slimtune.merged_state_dict(model)
    plain = slimtune.merge_and_unload(model)
    assert not slimtune.adapter_names(plain) and slimtune.get_config(plain) is None
    assert not any(isinstance(m, AdapterHost) for m in plain.modules())
    assert {k: type(m) for k, m in plain.named_modules()} == {k: type(m) for k, m in base.named_modules()}
    state = plain.state_dict()
    assert set(state) == set(merged)
    for key, tensor in state.items():
        torch.testing.assert_close(tensor, merged[key], atol=0, rtol=0, msg=key)
    torch.testing.assert_close(logits(plain, x), expected, atol=1e-5, rtol=0)
    slimtune.add_adapter(plain, tiny_preset(method))  # a plain model again: it takes a new adapter


def test_save_load_round_trip_bit_exact(arch, method, path, tmp_path):
    base, model = adapted(arch, method)
    x = batch(base)
    slimtune.save_adapter(model, tmp_path)
    loaded = slimtune.load_adapter(clone(base), tmp_path)
    for (k, a), (k2, b) in zip(slimtune.trainable_parameters(model).items(),
                               slimtune.trainable_parameters(loaded).items()):
        assert k == k2 and torch.equal(a, b)
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_only_declared_tensors_require_grad(arch, method):
    _, model = adapted(arch, method)
    declared = {id(p) for p in slimtune.trainable_parameters(model).values()}
    assert declared
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in declared), name


def test_every_trained_tensor_gets_a_gradient(arch, method, path):
    base, model = adapted(arch, method)
    logits(model, batch(base, B=4, T=16)).square().mean().backward()  # 64 tokens: every routed expert gets some
    for name, p in slimtune.trainable_parameters(model).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_real_init_trains_every_part(arch, method, path):
    # From the paper's init (delta W = 0), two SGD steps move every trained tensor:
    # no pair of zero factors blocks each other's gradient.
    base, model = adapted(arch, method, identity=True)
    params = slimtune.trainable_parameters(model)
    opt = torch.optim.SGD(params.values(), lr=1.0)
    x = batch(base, B=4, T=16)  # 64 tokens: every routed expert gets some
    targets = torch.randint(0, 64, x["input_ids"].shape, generator=torch.Generator().manual_seed(3))
    if "decoder_input_ids" in x:
        targets = targets[:, : x["decoder_input_ids"].shape[1]]
    for step in range(2):
        opt.zero_grad()
        out = logits(model, x)
        torch.nn.functional.cross_entropy(out.flatten(0, 1), targets.flatten()).backward()
        if step == 0:  # at init only the zero factor's partner moves; the other grads are exactly 0
            assert any(p.grad.abs().sum() > 0 for p in params.values())
        opt.step()
    for k, p in params.items():
        assert p.grad.abs().sum() > 0, k


LOWRANK = ["lora", "vera", "tied-lora", "tied-lora-ba", "tied-lora-paper"]


def _loss_and_grads(model, x):
    params = slimtune.trainable_parameters(model)
    for p in params.values():
        p.grad = None
    out = logits(model, x)
    out.square().mean().backward()
    return out.detach(), {k: p.grad.clone() for k, p in params.items()}


@pytest.mark.parametrize("training", [False, True])
def test_fast_path_equals_the_reference(arch, method, training):
    """The fused forms, sibling sharing and BLAS order against the plain formula: outputs and
    every gradient, on a second forward (when sibling groups are known), with adapter dropout
    drawing the same masks on both paths when training."""
    if method in ("ia3", "mov", "full"):
        pytest.skip("(IA)3, MoV and full fine-tuning have no fast path")
    base = tiny(arch).requires_grad_(False)
    cfg = tiny_preset(method)
    drop = {k: 0.1 if training else 0.0 for k in ("dropout", "lora_dropout") if hasattr(cfg, k)}
    model = slimtune.add_adapter(clone(base), dataclasses.replace(cfg, **drop))
    perturb(model)
    model.train(training)
    x = batch(base)
    results = []
    lowrank = [site for site in layers(model).values() if hasattr(site, "parts")]  # the sites with a fast path
    assert lowrank and not any("_fast" in site.__dict__ for site in lowrank)
    for reference in (True, False):
        with fast.reference(reference):
            logits(model, x)  # the first forward learns the sibling groups
            torch.manual_seed(0)
            results.append(_loss_and_grads(model, x))
    (ref_out, ref_g), (out, g) = results
    assert all("_fast" in site.__dict__ for site in lowrank)  # the fast path really ran
    assert (ref_out - logits(base, x)).abs().max() > 1e-3  # the adapter acts
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("method", LOWRANK)
def test_every_form_agrees_with_the_reference(arch, method, monkeypatch):
    """Each of the fast path's forms, forced on every layer, against the reference formula."""
    base, model = adapted(arch, method)
    x = batch(base)
    with fast.reference():
        expected = _loss_and_grads(model, x)
    for form in ("per-token", "dense", "dense-a"):
        monkeypatch.setattr(FastLayer, "form", lambda self, x, parts, f=form: f)
        out, grads = _loss_and_grads(model, x)
        torch.testing.assert_close(out, expected[0], atol=1e-5, rtol=1e-5, msg=form)
        for k in grads:
            torch.testing.assert_close(grads[k], expected[1][k], atol=1e-5, rtol=1e-4, msg=f"{form} {k}")


@pytest.mark.parametrize("form", ["per-token", "dense", "dense-a"])
@pytest.mark.parametrize("method", ["lora", "vera"])
def test_each_form_under_cpu_autocast_keeps_fp32_gradients(method, form, monkeypatch):
    """A bf16 base with fp32 adapters under bf16 autocast (as the trainer runs one), each form
    forced: the functions compute in bf16, and the gradients arrive in fp32, close to those of
    the fp32 model on the reference (bf16's 8-bit mantissa: a few % in norm)."""
    _, model = adapted("llama", method)  # identity init off
    x = batch(model, B=4, T=16)
    monkeypatch.setattr(FastLayer, "form", lambda self, x, parts, f=form: f)
    grads = []
    for low in (False, True):
        m = clone(model)
        if low:
            m.to(torch.bfloat16)
            for p in slimtune.trainable_parameters(m).values():
                p.data = p.data.float()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low), fast.reference(not low):
            logits(m, x)  # the first forward learns the sibling groups
            logits(m, x).float().square().mean().backward()
        grads.append({k: p.grad for k, p in slimtune.trainable_parameters(m).items()})
    for k, g in grads[1].items():
        assert g.dtype == torch.float32, k
        assert (g - grads[0][k]).norm() < 5e-2 * grads[0][k].norm(), k


@pytest.mark.parametrize("method, r, tokens, grad, form", [
    ("lora", 4, 512, True, "per-token"),  # low rank: the per-token products are far cheaper
    ("vera", 4, 512, True, "dense-a"),  # A frozen, many tokens: one (out, in) ΔW, ∂ΔW Aᵀ from a = x Aᵀ
    ("vera", 64, 512, True, "dense"),  # r above in·out / (in + out): ∂ΔW Aᵀ from G = gᵀx
    ("tied-lora", 32, 512, True, "dense"),  # A trains: ∂A needs G anyway
    ("vera", 64, 1, False, "per-token"),  # generation (one token, no grad): per token again
])
def test_each_layer_picks_the_form_with_fewer_multiply_adds(method, r, tokens, grad, form):
    base = tiny("llama").requires_grad_(False)
    model = slimtune.add_adapter(clone(base), slimtune.preset(method, r=r, targets=["q_proj"]))
    site = next(iter(layers(model).values()))
    record = FastLayer.of(site)
    x = torch.randn(1, tokens, site.in_features)
    costs = record.flops(tokens, grad, record.trained(site.parts()))
    assert min(costs, key=costs.get) == form, costs
    assert sorted(costs.values())[0] < sorted(costs.values())[1]  # a clear winner, not a tie
    with torch.set_grad_enabled(grad):
        assert record.form(x, site.parts()) == form


def test_shared_tensors_created_once(arch):
    base = tiny(arch)
    model = slimtune.add_adapter(clone(base), tiny_preset("vera"))
    root = shared(model)
    assert sorted(root.frozen_tensors()) == ["A__model", "B__model"]
    largest_in = max(site.in_features for site in layers(model).values())
    assert root.A__model.shape[1] == largest_in
    for site in layers(model).values():
        assert site.part("A").data_ptr() == root.A__model.data_ptr()  # a view, not a copy


def _fn_inputs(with_vectors, trained="ABdb"):
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, W0, bias, A, B = make(2, 3, 5), make(4, 5), make(4), make(3, 5), make(4, 3)
    d, b = (make(3), make(4)) if with_vectors else (None, None)
    for name, t in zip("ABdb", (A, B, d, b)):
        if t is not None and name not in trained:
            t.requires_grad_(False)  # frozen, as VeRA's A and B are
    return x, W0, bias, A, B, d, b


@pytest.mark.parametrize("n", [1, 6, 7, 1024])
@pytest.mark.parametrize("flip", [True, False])
def test_products_split_over_tokens_equal_plain_ones(n, flip, monkeypatch):
    """blas.tn (Pᵀ Q) and blas.rows (P Q), split into one chunk of tokens per thread, against
    plain products, with alpha and in either operand order; n = 7 is not a multiple of 3."""
    from slimtune.adapters.fast import blas

    split_tokens(monkeypatch, True)
    g = torch.Generator().manual_seed(0)
    P, Q, R = (torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 4, generator=g, dtype=torch.float64),
               torch.randn(5, 3, generator=g, dtype=torch.float64))
    assert blas.chunks(n, 3, P) == {1: 1, 6: 3, 7: 1, 1024: 2}[n]
    torch.testing.assert_close(blas.tn(P, Q, flip, 0.7), 0.7 * P.T @ Q)
    torch.testing.assert_close(blas.tn(P, Q, flip), P.T @ Q)
    torch.testing.assert_close(blas.rows(P, R, flip, 0.7), 0.7 * P @ R)
    torch.testing.assert_close(blas.rows(P, R, flip), P @ R)


@pytest.mark.parametrize("trained", ["ABdb", "db", "B", "Ad"])
@pytest.mark.parametrize("with_vectors", [True, False])
@pytest.mark.parametrize("keep", ["x", "a made", "a given"])
@pytest.mark.parametrize("split", [True, False])
def test_dense_function_gradients(with_vectors, trained, keep, split, monkeypatch):
    """The fused dense form's hand-written backward against numerical gradients (float64), for
    every subset of trained parts, keeping x or a = x Aᵀ (made in the function or passed in by a
    sibling group, with no gradient through it), with the products split over tokens or not."""
    from slimtune.adapters.fast.fused import DenseLowRank

    split_tokens(monkeypatch, split)

    x, W0, bias, A, B, d, b = _fn_inputs(with_vectors, trained)

    def f(x, W0, bias, A, B, d, b):
        a = (x @ A.T).detach() if keep == "a given" else None
        return DenseLowRank.apply(x, W0, bias, A, B, d, b, 0.7, keep != "x", a)
    assert torch.autograd.gradcheck(f, (x, W0, bias, A, B, d, b))


@pytest.mark.parametrize("trained", ["ABdb", "db", "B", "Ad"])
@pytest.mark.parametrize("with_vectors", [True, False])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("skinny", [True, False])
@pytest.mark.parametrize("split", [True, False])
def test_per_token_function_gradients(with_vectors, trained, dropout, skinny, split, monkeypatch):
    """The fused per-token form against numerical gradients, for every subset of trained parts,
    with the adapter reading x itself or a separate (dropped-out) input, in both operand
    orders (the one for skinny ranks and the one for the others), split over tokens or not."""
    from slimtune.adapters.fast import blas
    from slimtune.adapters.fast.fused import PerTokenLowRank

    monkeypatch.setattr(blas, "SKINNY_R", 100 if skinny else 1)  # r = 3 below or above it
    split_tokens(monkeypatch, split)
    x, W0, bias, A, B, d, b = _fn_inputs(with_vectors, trained)
    xa = (x.detach() * 1.5).requires_grad_() if dropout else None
    assert torch.autograd.gradcheck(PerTokenLowRank.apply, (x, xa, W0, bias, A, B, d, b, 0.7))
