"""Mixed-adapter batches: every row of a batch computes with its own adapter (or none), and
equals the same row run alone with that adapter active. For every method, for a mix of
methods over one base, on the fast path (stacked and gathered) and on the reference (each
adapter's rows as a sub-batch)."""

from __future__ import annotations

import pytest
import torch
from conftest import METHODS, clone, tiny, tiny_preset

import slimtune
from slimtune.adapters.fast import rows as fast_rows

ARCHS = ["llama", "qwen2", "gpt2"]


def with_adapters(base, methods: list[str], seed: int = 5):
    """The base with one adapter per method, named a0, a1, ..., each perturbed off identity."""
    model = clone(base)
    g = torch.Generator().manual_seed(seed)
    for i, m in enumerate(methods):
        slimtune.add_adapter(model, tiny_preset(m), name=f"a{i}")
        with torch.no_grad():
            for t in slimtune.trainable_parameters(model, f"a{i}").values():
                t.copy_(t + 0.1 * torch.randn(t.shape, generator=g) if t.dim() == 1
                        else 0.05 * torch.randn(t.shape, generator=g))
    return model


@torch.no_grad()
def alone(model, ids: torch.Tensor, name: str | None) -> torch.Tensor:
    """One row's logits with its adapter active (None: the base model)."""
    if name is None:
        with slimtune.disable_adapters(model):
            return model(input_ids=ids).logits
    slimtune.set_active_adapter(model, name)
    return model(input_ids=ids).logits


@torch.no_grad()
def check_rows(model, names: list[str | None], seed: int = 0) -> None:
    ids = torch.randint(0, 64, (len(names), 6), generator=torch.Generator().manual_seed(seed))
    with slimtune.adapter_rows(model, names):
        mixed = model(input_ids=ids).logits
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i:i + 1], alone(model, ids[i:i + 1], n), atol=1e-5, rtol=0)
    if len({n for n in names}) > 1:  # non-vacuous: the rows' adapters differ in what they compute
        a, b = [n for n in dict.fromkeys(names)][:2]
        assert not torch.allclose(alone(model, ids[:1], a), alone(model, ids[:1], b), atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_each_row_equals_itself_alone(arch, method, path):
    model = with_adapters(tiny(arch), [method] * 3).eval()
    check_rows(model, ["a0", None, "a1", "a0", "a2"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_mixed_batch_of_different_methods_over_one_base(arch, path):
    methods = ["lora", "vera", "ia3", "tied-lora", "mov", "molora", "pesc"]
    model = with_adapters(tiny(arch), methods).eval()
    check_rows(model, ["a0", "a1", "a2", None, "a3", "a4", "a5", "a6", "a1"])


def test_vera_adapters_from_one_seed_share_their_pair_and_gather_only_vectors(monkeypatch):
    model = with_adapters(tiny("llama"), ["vera"] * 4).eval()
    roots = model.slimtune_adapters.roots
    ptrs = {roots[n].A__model.data_ptr() for n in roots}
    assert len(ptrs) == 1  # one frozen pair in memory for the four adapters
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or real_bmm(*a))
    check_rows(model, ["a0", "a1", "a2", "a3", None])
    assert not calls  # A x and B (.) once for the batch: no per-row matrices


@torch.no_grad()
def test_low_rank_sites_of_other_ranks_and_shared_pairs_stack_apart(monkeypatch):
    """LoRA of two ranks beside VeRA adapters sharing one pair: one stack per family (no LoRA
    padded to VeRA's rank, no copy of the shared pair per adapter), and every row, prefill and
    decoding steps, equals its adapter alone."""
    model = clone(tiny("llama"))
    g = torch.Generator().manual_seed(6)
    for name, method, r in (("l4", "lora", 4), ("l8", "lora", 8), ("v0", "vera", 16), ("v1", "vera", 16)):
        slimtune.add_adapter(model, slimtune.preset(method, r=r), name=name)
        for t in slimtune.trainable_parameters(model, name).values():
            t.data = 0.05 * torch.randn(t.shape, generator=g) + (t.data if t.dim() == 1 else 0)
    model.eval()
    stacked = []
    real = fast_rows._lowrank_stacks
    monkeypatch.setattr(fast_rows, "_lowrank_stacks", lambda every: stacked.append(every) or real(every))
    names = ["v0", "l4", None, "l8", "v1", "l4", "v0", "l8", "l8"]
    check_rows(model, names)
    assert stacked and all(len({s.r for s in every}) == 1 for every in stacked)
    for step in range(3):  # decoding: one token per row, the every-adapter-at-once form included
        ids = torch.randint(0, 64, (len(names), 1), generator=torch.Generator().manual_seed(step))
        with slimtune.adapter_rows(model, names):
            mixed = model(input_ids=ids).logits
        for i, n in enumerate(names):
            torch.testing.assert_close(mixed[i:i + 1], alone(model, ids[i:i + 1], n), atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("method", ["lora", "tied-lora", "vera", "ia3"])
def test_a_decoding_step_with_fewer_adapters_than_rows(method, path):
    """One token per row, 8 rows over 3 adapters and the base: the every-adapter-at-once form."""
    model = with_adapters(tiny("llama"), [method] * 3).eval()
    names = ["a0", "a1", "a2", None, "a1", "a1", "a0", "a2"]
    ids = torch.randint(0, 64, (8, 1), generator=torch.Generator().manual_seed(3))
    with slimtune.adapter_rows(model, names):
        mixed = model(input_ids=ids).logits
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i:i + 1], alone(model, ids[i:i + 1], n), atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("method", ["lora", "vera", "ia3"])
def test_decoding_steps_over_kept_and_changed_rows(method, path):
    """Steps over the same rows reuse what they gathered; new rows (more adapters than rows
    too) gather afresh: every row still equals its adapter alone."""
    model = with_adapters(tiny("llama"), [method] * 6).eval()
    g = torch.Generator().manual_seed(4)
    for names in (["a0", "a5", "a3", None], ["a0", "a5", "a3", None], ["a4", "a1", None, "a2", "a2"], ["a3"]):
        ids = torch.randint(0, 64, (len(names), 1), generator=g)
        with slimtune.adapter_rows(model, names):
            mixed = model(input_ids=ids).logits
        for i, n in enumerate(names):
            torch.testing.assert_close(mixed[i:i + 1], alone(model, ids[i:i + 1], n), atol=1e-5, rtol=0)


def test_rows_refuse_unknown_adapters():
    model = with_adapters(tiny("llama"), ["lora"])
    with pytest.raises(slimtune.SlimtuneError, match="no such adapter"):
        with slimtune.adapter_rows(model, ["a0", "nope"]):
            pass


def test_loading_new_values_restacks(tmp_path):
    """The gathered stacks follow the adapters' values: a reload is seen by the next batch."""
    base = tiny("llama")
    model = with_adapters(base, ["lora", "lora"]).eval()
    check_rows(model, ["a0", "a1"])
    other = with_adapters(base, ["lora"], seed=9)
    slimtune.save_adapter(other, tmp_path / "x", name="a0")
    slimtune.delete_adapter(model, "a1")
    slimtune.load_adapter(model, tmp_path / "x", name="a1")
    check_rows(model, ["a0", "a1", None])
    assert fast_rows.GATHER_MATRICES
