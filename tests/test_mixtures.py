"""Mixtures (MoV, MoLoRA, MixLoRA, PESC) against references written here: explicit loops over
experts and tokens, the Switch loss by its definition, finite differences. The common
properties (init = base, save -> load, gradients, merge refused) are in test_matrix.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, clone, layers, logits, perturb, tiny

import slimtune
from slimtune.adapters import fast
from slimtune.adapters.routing import Routing, balance_loss

ARCHS = ["llama", "qwen2", "gpt2"]


def capture(model, name: str):
    """The site's input and output on the next forward (hook on its host)."""
    seen = {}
    host = model.get_submodule(name)
    h = host.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    return seen, h


def naive_weights(logits: torch.Tensor, k: int | None, renormalize: bool) -> torch.Tensor:
    """Per-token expert weights by a loop over tokens, from the definition."""
    out = torch.zeros_like(logits)
    flat, res = logits.reshape(-1, logits.shape[-1]), out.view(-1, logits.shape[-1])
    for t in range(flat.shape[0]):
        z = flat[t]
        if k is None:
            res[t] = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
            continue
        kept = sorted(range(len(z)), key=lambda i: -float(z[i]))[:k]
        if renormalize:
            e = torch.stack([torch.exp(z[i] - z[kept[0]]) for i in kept])
            for j, i in enumerate(kept):
                res[t, i] = e[j] / e.sum()
        else:
            p = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
            for i in kept:
                res[t, i] = p[i]
    return out


@pytest.mark.parametrize("k", [1, 2, 5, None])
@pytest.mark.parametrize("renormalize", [True, False])
def test_routing_weights_equal_a_per_token_reference(k, renormalize):
    logits = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w, probs = Routing(5, k, renormalize).weights(logits)
    torch.testing.assert_close(w, naive_weights(logits, None if k == 5 else k, renormalize))
    torch.testing.assert_close(probs, torch.softmax(logits, -1))


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("router_input", ["scaled", "hidden"])
@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_mov_equals_a_loop_over_experts(arch, router_input, top_k):
    """y = W0 x ⊙ Σ_e p_e V_e at an output site (per head when the router reads the scaled tensor),
    W0 (x ⊙ Σ_e p_e V_e) at the FFN site, summed here expert by expert."""
    base = tiny(arch).requires_grad_(False)
    model = slimtune.add_adapter(clone(base), slimtune.preset("mov", experts=4, router_input=router_input,
                                                              top_k=top_k))
    perturb(model)
    x = batch(base)
    for name, site in layers(model).items():
        seen, h = capture(model, name)
        logits(model, x)
        h.remove()
        xin, yout = seen["x"], seen["y"]
        n = site.stop - site.start
        if site.where == "input":
            l = torch.zeros(*xin.shape[:2], n)
            w = naive_weights(xin @ site.W_r.T, top_k, True)
            for e in range(4):
                l += w[..., e:e + 1] * site.V[e]
            host = model.get_submodule(name)
            torch.testing.assert_close(yout, host.base(xin * l), atol=1e-5, rtol=1e-5, msg=name)
            continue
        host = model.get_submodule(name)
        y = host.base(xin)
        ys = y[..., site.start:site.stop]
        if site.heads > 1:  # one routing per head, on that head's slice of the scaled tensor
            hd = n // site.heads
            l = torch.zeros_like(ys)
            for h_ in range(site.heads):
                sl = slice(h_ * hd, (h_ + 1) * hd)
                w = naive_weights(ys[..., sl] @ site.W_r.T, top_k, True)
                for e in range(4):
                    l[..., sl] += w[..., e:e + 1] * site.V[e, sl]
        else:
            r_in = ys if router_input == "scaled" else xin
            w = naive_weights(r_in @ site.W_r.T, top_k, True)
            l = sum(w[..., e:e + 1] * site.V[e] for e in range(4))
        expected = torch.cat([y[..., :site.start], ys * l, y[..., site.stop:]], -1)
        torch.testing.assert_close(yout, expected, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("top_k", [None, 1, 2, 3])
@pytest.mark.parametrize("path", ["fast", "reference"])
def test_molora_equals_a_loop_over_experts(arch, top_k, path):
    """h = W0 x + s Σ_e w_e B_e A_e x, expert by expert, on both paths; and the gradients of the
    stacked form equal the loop's."""
    base = tiny(arch).requires_grad_(False)
    model = slimtune.add_adapter(clone(base), slimtune.preset("molora", experts=3, r=2, top_k=top_k))
    perturb(model)
    x = batch(base)
    name, site = next(iter(layers(model).items()))
    seen, h = capture(model, name)
    with fast.reference(path == "reference"):
        logits(model, x)  # learn the sibling groups
        out = logits(model, x)
    h.remove()
    xin = seen["x"].detach().requires_grad_()
    host = model.get_submodule(name)
    with fast.reference(path == "reference"):
        y = host(xin)
    w = naive_weights(xin @ site.W_r.T, top_k, True)
    ref = host.base(xin)
    for e in range(3):
        A, B = site.A[2 * e:2 * e + 2], site.B[:, 2 * e:2 * e + 2]  # expert e's slots of the stacked rank
        ref = ref + site.scale * w[..., e:e + 1] * (xin @ A.T @ B.T)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    ours = torch.autograd.grad(y, [site.A, site.B, site.W_r, xin], g)
    theirs = torch.autograd.grad(ref, [site.A, site.B, site.W_r, xin], g)
    for a, b, what in zip(ours, theirs, "A B W_r x".split()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=what)
    assert torch.isfinite(out).all()


def test_the_per_token_fused_function_gradients():
    """PerTokenLowRank with a per-token d (MoLoRA's) against numerical gradients (float64)."""
    from slimtune.adapters.fast.fused import PerTokenLowRank

    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
    x, W0, bias, A, B, d = t(2, 3, 5), t(4, 5).detach(), t(4).detach(), t(6, 5), t(4, 6), t(6, 6)
    assert torch.autograd.gradcheck(lambda x, A, B, d: PerTokenLowRank.apply(x, None, W0, bias, A, B, d, None, 0.7),
                                    (x, A, B, d))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("dispatch", ["gather", "dense"])
def test_pesc_equals_a_per_token_reference_and_copies_of_the_ffn(arch, top_k, dispatch):
    """PESC's block against naive sparse upcycling: each expert a full copy of the FFN followed by
    its adapter, every token run through the experts it is routed to, one by one. The shared
    FFN itself runs once per forward."""
    base = tiny(arch).requires_grad_(False)
    model = slimtune.add_adapter(clone(base), slimtune.preset("pesc", top_k=top_k, dispatch=dispatch, lora_r=0))
    perturb(model)
    x = batch(base)
    name, site = next((n, s) for n, s in layers(model).items() if type(s).__name__ == "PESCBlock")
    host = model.get_submodule(name)
    seen, h = capture(model, name)
    calls = []
    hb = host.base.register_forward_hook(lambda *a: calls.append(1))
    out = logits(model, x)
    h.remove(), hb.remove()
    assert len(calls) == 1  # the shared FFN: once per forward, not once per expert
    xin = seen["x"].detach()
    copies = [clone(host.base) for _ in range(site.W_r.shape[0])]  # naive upcycling: one FFN per expert
    w = naive_weights(xin @ site.W_r.T, None if top_k == 8 else top_k, True)
    ref = torch.zeros_like(seen["y"])
    for b in range(xin.shape[0]):
        for t in range(xin.shape[1]):
            for e in range(len(copies)):
                if w[b, t, e] > 0:
                    u = copies[e](xin[b, t])
                    adapter = site.W_up[e] @ F.gelu(site.W_down[e] @ u)
                    ref[b, t] += w[b, t, e] * (u + site.s * adapter)
    torch.testing.assert_close(seen["y"], ref, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(out).all()


def test_pesc_dispatches_agree_in_value_and_gradient():
    base = tiny("llama").requires_grad_(False)
    outs = []
    for dispatch in ("gather", "dense"):
        model = slimtune.add_adapter(clone(base), slimtune.preset("pesc", dispatch=dispatch))
        perturb(model)
        out = logits(model, batch(base, B=4, T=16))
        out.square().mean().backward()
        outs.append((out.detach(), {k: p.grad for k, p in slimtune.trainable_parameters(model).items()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    for k in outs[0][1]:
        torch.testing.assert_close(outs[0][1][k], outs[1][1][k], atol=1e-6, rtol=1e-4, msg=k)


def test_the_balance_loss_is_one_for_a_uniform_router_and_n_for_a_collapsed_one():
    n, T = 8, 64
    mask = torch.ones(1, T, dtype=torch.bool)
    uniform = torch.zeros(1, T, n)  # every logit equal
    for k in (None, 2):
        w, p = Routing(n, k).weights(uniform)
        assert float(balance_loss(w, p, mask, k is None)) / T == pytest.approx(1.0)
    collapsed = torch.zeros(1, T, n)
    collapsed[..., 0] = 50.0
    for k in (None, 1, 2):
        w, p = Routing(n, k).weights(collapsed)
        assert float(balance_loss(w, p, mask, k is None)) / T == pytest.approx(n, rel=1e-3 if k != 2 else 0.6)
    # by its definition: n Σ_i f_i P_i, f from the top-1 counts, P the mean probability
    logits = torch.randn(1, T, n, generator=torch.Generator().manual_seed(0))
    w, p = Routing(n, None).weights(logits)
    f = torch.bincount(logits[0].argmax(-1), minlength=n).float() / T
    assert float(balance_loss(w, p, mask, True)) / T == pytest.approx(float(n * (f * p[0].mean(0)).sum()), rel=1e-5)


def test_the_balance_loss_gradient_matches_finite_differences():
    """Its gradient reaches the router through P (f is a count) and is not zero."""
    n = 6
    x = torch.randn(2, 9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    W = torch.randn(n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False  # padding does not count

    def loss(W):
        w, p = Routing(n, 2).weights(x @ W.T)
        return balance_loss(w, p, mask, False)
    g, = torch.autograd.grad(loss(W), W)
    assert g.abs().sum() > 0
    assert torch.autograd.gradcheck(loss, (W,))  # the routing choice is constant near W: f is


def test_with_top2_the_router_learns_from_the_lm_loss_alone():
    for method in ("molora", "pesc", "mov"):
        model = slimtune.add_adapter(tiny("llama"), slimtune.preset(method, top_k=2, balance=0.0))
        perturb(model)
        model.train()
        logits(model, batch(model)).square().mean().backward()
        routers = {k: p for k, p in slimtune.trainable_parameters(model).items() if k.endswith("W_r")}
        assert routers and all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers.values()), method


def test_accumulation_splits_give_the_same_loss_and_gradients_with_the_balance_loss(tiny_dir, tmp_path):
    """MixLoRA (top-2, balance 0.01) through the loop: 8x1 and 1x8 give the same LM loss,
    balance loss and gradients. The balance loss's groups are sequences, so the split into
    micro-batches does not change it."""
    from slimtune.train.loop import setup, train_step
    from test_train import cfg_for

    results = {}
    for b, a in ((8, 1), (1, 8), (4, 2)):
        run = setup(cfg_for(tiny_dir, tmp_path / f"{b}x{a}", method="mixlora", batch_size=b, grad_accum=a,
                            max_grad_norm=0.0))
        with torch.no_grad():
            for k, p in slimtune.trainable_parameters(run.model).items():
                if k.endswith(".B"):
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(k)))
        seen = []
        real = run.opt.step
        run.opt.step = lambda: seen.append({k: p.grad.clone() for k, p in
                                            slimtune.trainable_parameters(run.model).items()})
        stats = train_step(run, 0)
        run.opt.step = real
        results[(b, a)] = (stats, seen[0])
    ref, ref_g = results[(8, 1)]
    assert ref.aux["balance"][0] > 0
    for stats, grads in results.values():
        assert stats.loss == pytest.approx(ref.loss, rel=1e-5)
        assert stats.aux["balance"][0] == pytest.approx(ref.aux["balance"][0], rel=1e-5)
        for k, g in ref_g.items():
            torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-7, msg=k)


def test_router_statistics_count_what_was_routed():
    model = slimtune.add_adapter(tiny("llama"), slimtune.preset("pesc", top_k=2))
    model.train()
    x = batch(model, B=3, T=10)
    logits(model, x)
    stats = slimtune.router_stats(model)
    assert sorted(stats) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for s in stats.values():
        assert s["tokens"] == 30 and len(s["load"]) == 8 and sum(s["load"]) == pytest.approx(1.0, abs=1e-3)
        assert 0 < s["entropy"] <= 1 and s["dropped"] == 0
    assert slimtune.router_stats(model) == {}  # read and reset
    with torch.no_grad():  # evaluation forwards are not counted
        logits(model, x)
    assert slimtune.router_stats(model) == {}


@pytest.mark.parametrize("method, expected", [
    # PESC at Camelidae's 7B settings: L n 2 d a adapter parameters, routers L d n, LoRA r = 64 on all 7 layers
    ("pesc", 32 * 8 * 2 * 4096 * 512 + 32 * 4096 * 8 + 159_907_840),
    # MoV-10 on k, v, down: E vectors per site plus a router (per head at k and v: head_dim wide)
    ("mov", 32 * (2 * (10 * 4096 + 10 * 128) + 10 * 11008 + 10 * 11008)),
    # MoLoRA-10 x r4 on all 7 linear layers: E r (in + out) plus a router (in) per layer
    ("molora", 32 * sum(40 * (i + o) + 10 * i for i, o in [(4096, 4096)] * 4 + [(4096, 11008)] * 2
                        + [(11008, 4096)])),
])
def test_params_of_the_mixtures_on_llama_2_7b(method, expected, capsys):
    from slimtune.cli import main

    extra = ["--width", "512", "--lora_r", "64"] if method == "pesc" else []
    assert main(["params", "--model", "llama-2-7b", "--method", method, "--json", *extra]) == 0
    import json

    got = json.loads(capsys.readouterr().out)
    assert got["trainable"] == expected
    if method == "pesc":
        assert 32 * 8 * 2 * 4096 * 512 == 1_073_741_824  # the adapters alone
        assert 7.9e9 < got["trainable"] + got["base"] < 8.1e9  # near the paper's 8B in all


def test_upcycle_is_the_dense_model_at_step_zero():
    base = tiny("llama").requires_grad_(False)
    model = slimtune.adapters.upcycle(clone(base), experts=4, lora_r=0)
    x = batch(base)
    torch.testing.assert_close(logits(model, x), logits(base, x), atol=1e-6, rtol=0)
    assert math.isclose(slimtune.count_parameters(model).trainable, 2 * (4 * 32 + 2 * 4 * 64 * 32))


@pytest.mark.parametrize("method", ["mov", "molora", "mixlora", "pesc"])
def test_each_mixture_trains_through_the_cli_and_draws_its_router_load(method, tiny_dir, tmp_path):
    import json

    from slimtune.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", tiny_dir, "--method", method, "--steps", "4", "--batch_size", "4",
                 "--demo_rows", "40", "--eval_generate", "0", "--log_every", "2", "--lr", "1e-2",
                 "--out", str(out), "--progress", "false"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    routed = [r for r in records if "router" in r]
    assert len(routed) == 2 and 0 < routed[-1]["router_entropy"] <= 1
    first = next(iter(routed[-1]["router"].values()))
    assert sum(first["load"]) == pytest.approx(1.0, abs=1e-3) and first["dropped"] == 0
    if method in ("mixlora", "pesc"):
        assert all("aux_balance" in r for r in records if "loss" in r)
    assert (out / "router_load.png").stat().st_size > 1000
    model = slimtune.load_adapter(slimtune.load_model(tiny_dir), out / "adapter")
    assert slimtune.get_config(model).method == {"mixlora": "molora"}.get(method, method)


def test_the_upcycled_export_loads_in_transformers_with_its_own_code(tiny_dir, tmp_path, capsys):
    """A trained PESC adapter, exported by `slimtune upcycle` with its LoRA merged, loads with
    AutoModelForCausalLM(trust_remote_code=True) and computes what slimtune computes."""
    from transformers import AutoModelForCausalLM

    from slimtune.cli import main

    assert main(["train", "--model", tiny_dir, "--method", "pesc", "--steps", "3", "--batch_size", "4",
                 "--demo_rows", "40", "--eval_generate", "0", "--lr", "1e-2", "--out", str(tmp_path / "run"),
                 "--progress", "false"]) == 0
    assert main(["upcycle", "--model", tiny_dir, "--adapter", str(tmp_path / "run" / "adapter"), "--out",
                 str(tmp_path / "up")]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    ours = slimtune.load_adapter(slimtune.load_model(tiny_dir), tmp_path / "run" / "adapter").eval()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "up", trust_remote_code=True).eval()
    assert type(theirs).__name__ == "PESCForCausalLM" and not any("lora" in k for k in theirs.state_dict())
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)
        assert (ours(ids).logits - slimtune.load_model(tiny_dir)(ids).logits).abs().max() > 1e-4  # it trained
    assert main(["upcycle", "--model", tiny_dir, "--out", str(tmp_path / "fresh"), "--experts", "4"]) == 0
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "fresh", trust_remote_code=True).eval()
    with torch.no_grad():  # at step 0 the upcycled model is the dense one
        torch.testing.assert_close(fresh(ids).logits, slimtune.load_model(tiny_dir)(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_upcycled_export_is_refused_without_trust_remote_code(arch, tmp_path):
    """The export has a model_type of its own: plain transformers refuses it (it once kept the
    base's, and AutoModelForCausalLM built the dense base with the FFN weights left random), and
    with trust_remote_code it is the model slimtune computes, LoRA merged."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from slimtune.formats.upcycled import export_upcycled

    model = slimtune.adapters.upcycle(tiny(arch), experts=4, lora_r=4)
    perturb(model)
    out = export_upcycled(model.eval(), tmp_path / "up")
    for flag in [{}, {"trust_remote_code": False}]:
        with pytest.raises(ValueError, match="trust_remote_code"):
            AutoModelForCausalLM.from_pretrained(out, **flag)
        with pytest.raises(ValueError, match="trust_remote_code"):
            AutoConfig.from_pretrained(out, **flag)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "slimtune_pesc" and set(saved["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(theirs).__name__ == "PESCForCausalLM" and theirs.config.model_type == "slimtune_pesc"
    x = batch(model)
    torch.testing.assert_close(logits(theirs, x), logits(model, x), atol=1e-5, rtol=1e-5)
    assert (logits(model, x) - logits(tiny(arch), x)).abs().max() > 1e-3  # not the dense model


def test_pesc_trains_over_a_4bit_base(tiny_dir, tmp_path):
    """The QLoRA of the paper: a frozen NF4 base under PESC's LoRA, its adapters and routers in
    float32."""
    pytest.importorskip("bitsandbytes")
    from slimtune.train.loop import setup, train_step
    from test_train import cfg_for

    run = setup(cfg_for(tiny_dir, tmp_path, method="pesc", quantize="nf4", steps=4))
    host = run.model.model.layers[0].mlp
    assert type(host.base.gate_proj.base).__name__ == "Linear4bit"  # PESC's block around the NF4 FFN, LoRA inside
    assert all(p.dtype == torch.float32 for p in run.params)
    losses = [train_step(run, s).loss for s in range(4)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
