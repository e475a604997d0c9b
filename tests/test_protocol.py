"""The open registry and the adapter contract, proven by a method defined here, in the test:
it wraps a whole MLP block (not a linear layer), routes each token, reports an auxiliary
loss, declares a router and a vector in their own optimiser groups, and cannot be merged.
It trains, saves and loads through the command line's own code path with slimtune unchanged."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, clone, logits, tiny
from torch import nn

import slimtune
from slimtune.adapters import registry
from slimtune.cli import main
from slimtune.configs import field
from slimtune.models.layers import logical_modules
from slimtune.train.loop import setup, train_step
from test_train import cfg_for


@dataclass
class ToyConfig(slimtune.AdapterConfig):
    """y = MLP(x) + p(x)_0 · v: a per-token gate on one learned vector after each MLP block."""

    method: str = field("toy", "adapter family")
    preset: str = field("toy", "the preset")
    block: str = field("mlp", "the modules (by last name) the adapter wraps")
    balance: float = field(0.5, "weight of the auxiliary loss: the mean over tokens of p_0²")

    def problems(self, p):
        if self.balance < 0:
            p.add(f"balance={self.balance}", "a loss weight is not negative", "give a value >= 0")


class ToySite(slimtune.SiteAdapter):
    mergeable = False

    def __init__(self, root, width: int, gen: torch.Generator):
        super().__init__(root)
        self.declare("router", torch.randn(2, width, generator=gen) * 0.5, "router")  # (2, d)
        self.declare("v", torch.zeros(width), "vector")  # (d,)

    def forward(self, base, x):
        p = F.softmax(F.linear(x, self.router).float(), -1)  # (B, T, 2)
        mask = self.token_mask(x)  # (B, T) real tokens
        self.report("toy_balance", (p[..., 0] ** 2 * mask).sum(), self.root.config.balance)
        return base(x) + p[..., :1].to(x.dtype) * self.v  # (B, T, d)


def inject_toy(model: nn.Module, cfg: ToyConfig, root) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {n: ToySite(root, model.config.hidden_size, gen) for n, m in logical_modules(model)
            if n.rsplit(".", 1)[-1] == cfg.block}


@pytest.fixture
def toy():
    registry.register_method(registry.Method("toy", ToyConfig, inject_toy))
    registry.register_preset("toy", lambda: ToyConfig())
    yield
    registry.METHODS.pop("toy"), registry.PRESETS.pop("toy")


def test_a_method_registered_from_outside_trains_saves_and_loads_through_the_cli(toy, tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_dir, "--method", "toy", "--adapter.balance", "0.25", "--steps", "4",
                 "--batch_size", "4", "--demo_rows", "40", "--eval_generate", "2", "--max_new_tokens", "3",
                 "--lr_router", "0.05", "--lr_vectors", "0.05", "--out", str(out), "--progress", "false"]) == 0
    assert "trainable parameters" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("aux_toy_balance" in r for r in records)  # the auxiliary loss is logged
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert conf["format"] == "slimtune-adapter" and conf["config"]["balance"] == 0.25  # PEFT has no such type
    model = slimtune.load_adapter(slimtune.load_model(tiny_dir), out / "adapter")
    assert type(model.model.layers[0].mlp).__name__ == "AdapterHost"  # a whole MLP block is wrapped
    assert slimtune.count_parameters(model).trainable == 2 * (2 * 32 + 32)
    trained = slimtune.trainable_parameters(model)
    assert all(p.abs().sum() > 0 for k, p in trained.items() if k.endswith(".v"))  # it trained: v left 0
    assert main(["eval", "--model", tiny_dir, "--adapter", str(out / "adapter"), "--limit", "2",
                 "--max_new_tokens", "2", "--out", str(tmp_path / "eval.jsonl")]) == 0
    assert main(["train", "--model", tiny_dir, "--method", "toy", "--adapter.balance", "-1", "--out",
                 str(tmp_path / "bad")]) == 2
    assert "balance=-1" in capsys.readouterr().err


def test_merging_a_method_that_cannot_merge_is_refused_by_name(toy):
    model = slimtune.add_adapter(tiny("llama"), slimtune.preset("toy"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for fold in (slimtune.merge_adapters, slimtune.merged_state_dict, slimtune.merge_and_unload):
        with pytest.raises(slimtune.SlimtuneError, match="adapter toy \\(toy\\) at model.layers.0.mlp.*does not fold"):
            fold(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_each_optimiser_group_takes_its_own_rate_and_decay(toy, tiny_dir, tmp_path):
    run = setup(cfg_for(tiny_dir, tmp_path, method="toy", lr=0.5, lr_vectors=0.25, lr_router=0.125,
                        weight_decay_router=0.01, weight_decay_vectors=0.002))
    groups = {g["group"]: g for g in run.opt.param_groups}
    assert set(groups) == {"router", "vector"}
    assert (groups["router"]["lr"], groups["router"]["weight_decay"]) == (0.125, 0.01)
    assert (groups["vector"]["lr"], groups["vector"]["weight_decay"]) == (0.25, 0.002)
    assert all(p.dim() == 2 for p in groups["router"]["params"]) and all(p.dim() == 1 for p in groups["vector"]["params"])


def test_accumulation_splits_give_the_same_total_loss_and_gradients_with_an_auxiliary_loss(toy, tiny_dir, tmp_path):
    """1x8, 4x2 and 8x1 (micro-batch x accumulation): the same LM loss, auxiliary loss and
    gradients, with padding in the micro-batches (the auxiliary loss counts real tokens only)."""
    results = {}
    for b, a in ((8, 1), (4, 2), (1, 8)):
        run = setup(cfg_for(tiny_dir, tmp_path / f"{b}x{a}", method="toy", batch_size=b, grad_accum=a,
                            max_grad_norm=0.0, lr=1e-9, lr_vectors=1e-9, lr_router=1e-9))
        with torch.no_grad():  # identity init off: v moves the output, so every gradient is non-trivial
            for k, p in slimtune.trainable_parameters(run.model).items():
                if k.endswith(".v"):
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(k)))
        seen = []
        real_step = run.opt.step
        run.opt.step = lambda: seen.append({k: p.grad.clone() for k, p in
                                            slimtune.trainable_parameters(run.model).items()})
        stats = train_step(run, 0)
        run.opt.step = real_step
        results[(b, a)] = (stats, seen[0])
    ref_stats, ref_grads = results[(8, 1)]
    assert ref_stats.aux["toy_balance"][0] > 0 and ref_stats.total > ref_stats.loss
    for stats, grads in results.values():
        assert stats.loss == pytest.approx(ref_stats.loss, rel=1e-5)
        assert stats.aux["toy_balance"][0] == pytest.approx(ref_stats.aux["toy_balance"][0], rel=1e-5)
        for k, g in ref_grads.items():
            torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-7, msg=k)


def test_the_auxiliary_loss_is_in_the_gradient(toy):
    """The router's gradient with the auxiliary loss weighted in equals the LM loss's plus the
    weight times the auxiliary loss's own gradient, computed here directly."""
    model = slimtune.add_adapter(tiny("llama"), slimtune.preset("toy", balance=0.5))
    x = batch(model)
    router = next(p for k, p in slimtune.trainable_parameters(model).items() if k.endswith("0.mlp.router"))
    grads = []
    for weight in (0.0, 1.0):
        router.grad = None
        with slimtune.adapters.collect_aux_losses(model) as aux:
            lm = logits(model, x).square().mean()
        (lm + weight * sum(a.weight * a.total for a in aux)).backward()
        grads.append(router.grad.clone())
    router.grad = None
    h = model.model.embed_tokens(x["input_ids"])  # layer 0's MLP input, recomputed for the reference
    layer0 = model.model.layers[0]
    h = h + layer0.self_attn(layer0.input_layernorm(h), position_embeddings=model.model.rotary_emb(h, torch.arange(
        h.shape[1])[None]), attention_mask=None)[0]
    p0 = F.softmax(F.linear(layer0.post_attention_layernorm(h), router), -1)[..., 0]
    (0.5 * (p0 ** 2).sum()).backward()
    assert router.grad.abs().sum() > 0
    torch.testing.assert_close(grads[1] - grads[0], router.grad, rtol=1e-3, atol=1e-6)


def test_unknown_method_names_the_registered_ones(toy):
    with pytest.raises(slimtune.SlimtuneError, match="'toy'"):
        slimtune.preset("tooy")
    plain = clone(tiny("llama"))
    with pytest.raises(slimtune.SlimtuneError, match="its method is not registered"):
        slimtune.add_adapter(plain, ToyConfig(method="nope"))
