"""Batches with 4-D masks and positions: packing keeps examples apart, the loss and generation
take such masks, and the lean decoding loop equals transformers' generate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import LLAMA_LIKE
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

import slimtune
from slimtune.data.batches import Prepared, collate, pack, segment_mask, segment_positions
from slimtune.data.rows import IGNORE
from slimtune.eval.generation import decode
from slimtune.models.attention import model_mask, real_tokens
from slimtune.train.loss import CausalLMLoss

MODELS = {
    "llama": lambda impl: LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE, attn_implementation=impl)),
    "qwen2": lambda impl: Qwen2ForCausalLM(Qwen2Config(**LLAMA_LIKE, attn_implementation=impl)),
    "gpt2": lambda impl: GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                    attn_implementation=impl)),
}


def model_for(arch: str, impl: str):
    torch.manual_seed(0)
    model = MODELS[arch](impl).eval()
    return slimtune.add_adapter(model, slimtune.preset("lora", r=4))  # an adapter on top, as in training


def examples(n: int = 5, seed: int = 0) -> Prepared:
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        T = int(torch.randint(3, 12, (), generator=g))
        row = torch.randint(0, 64, (T,), generator=g).tolist()
        cut = int(torch.randint(1, T, (), generator=g))
        ids.append(row), labels.append([IGNORE] * cut + row[cut:])
    return Prepared(ids, labels)


def per_token_loss(model, batch) -> torch.Tensor:
    """(B, T-1) loss of each next-token prediction, 0 where no label."""
    mask = model_mask(batch["attention_mask"], model, torch.float32)
    kw = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    out = model(input_ids=batch["input_ids"], attention_mask=mask, **kw).logits[:, :-1]
    target = batch["labels"][:, 1:]
    loss = F.cross_entropy(out.transpose(1, 2), target.clamp(min=0), reduction="none")
    return loss * (target != IGNORE)


@torch.no_grad()
@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_packed_batch_gives_each_example_the_loss_it_has_alone(arch, impl):
    model = model_for(arch, impl)
    prep = examples()
    packed = pack(prep, max_len=20)
    assert len(packed.input_ids) < len(prep.input_ids)  # really packed
    b = collate(**packed.rows(list(range(len(packed.input_ids)))), pad_id=0)
    assert b["attention_mask"].shape == (len(packed.input_ids), 1, b["input_ids"].shape[1], b["input_ids"].shape[1])
    losses = per_token_loss(model, b)
    got = []
    for r, seg in enumerate(packed.segments):
        seg = torch.tensor(seg[1:])  # the segment of each prediction's target
        got += [losses[r, : len(seg)][seg == k].sum() for k in range(int(seg.max()) + 1)]
    alone = [per_token_loss(model, collate([i], [l], 0)).sum() for i, l in zip(prep.input_ids, prep.labels)]
    assert len(got) == len(alone)
    torch.testing.assert_close(torch.stack(got), torch.stack(alone), atol=1e-5, rtol=1e-5)
    # without the mask the examples would see each other: the check above can fail
    leaky = dict(b, attention_mask=real_tokens(b["attention_mask"]).long())
    leaky.pop("position_ids")
    assert (per_token_loss(model, leaky) - losses).abs().max() > 1e-3


def test_the_packed_mask_and_positions_against_a_loop():
    segments = torch.tensor([[0, 0, 1, 1, 1, 2, -1], [0, 0, 0, 0, -1, -1, -1]])
    mask, pos = segment_mask(segments)[:, 0], segment_positions(segments)
    for b in range(2):
        for q in range(7):
            assert pos[b, q] == (0 if segments[b, q] < 0 else sum(segments[b, k] == segments[b, q] for k in range(q)))
            for k in range(7):
                expected = k <= q and segments[b, q] == segments[b, k] and segments[b, q] >= 0
                assert bool(mask[b, q, k]) == bool(expected), (b, q, k)


def test_the_loss_module_takes_a_packed_batch(tiny_dir):
    """CausalLMLoss (the loop's) on a packed batch: the summed loss of the examples alone."""
    model = slimtune.load_model(tiny_dir).eval()
    prep = examples(seed=3)
    packed = pack(prep, max_len=24)
    loss = CausalLMLoss(model)
    with torch.no_grad():
        s, n = loss(**collate(**packed.rows(list(range(len(packed.input_ids)))), pad_id=0))
        alone = [loss(**collate([i], [l], 0)) for i, l in zip(prep.input_ids, prep.labels)]
    assert int(n) == sum(int(k) for _, k in alone)
    torch.testing.assert_close(s, sum(a for a, _ in alone), atol=1e-4, rtol=1e-5)


def test_packing_trains_through_the_loop(tiny_dir, tmp_path):
    from test_train import cfg_for

    s = slimtune.run_training(cfg_for(tiny_dir, tmp_path, packing=True, steps=2, batch_size=2))
    assert len(s["losses"]) == 2 and all(v == v for v in s["losses"].values())


def test_flash_attention_is_refused_for_4d_masks():
    model = model_for("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(slimtune.SlimtuneError, match="flash attention reads only padding"):
        model_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool), model, torch.float32)


@torch.no_grad()
@pytest.mark.parametrize("arch", list(MODELS))
def test_greedy_decoding_equals_transformers_generate(arch):
    model = model_for(arch, "sdpa")
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    b = collate(rows, rows, pad_id=0, side="left")
    ours = decode(model, b["input_ids"], b["attention_mask"], max_new_tokens=6, eos_token_id=3, pad_token_id=0)
    theirs = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=6,
                            do_sample=False, eos_token_id=3, pad_token_id=0, top_k=None, temperature=None,
                            top_p=None)[:, b["input_ids"].shape[1]:]
    assert torch.equal(ours, theirs[:, : ours.shape[1]])


@torch.no_grad()
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_4d_prompt_mask_generates_like_its_2d_twin(impl):
    """The causal-and-padding mask written out in 4-D gives the same tokens as the 2-D one."""
    model = model_for("llama", impl)
    rows = [[5, 6, 7, 8, 9], [10, 11]]
    b = collate(rows, rows, pad_id=0, side="left")
    real = b["attention_mask"].bool()
    T = real.shape[1]
    four = (torch.ones(T, T, dtype=torch.bool).tril() & real[:, None, :] & real[:, :, None])[:, None]
    two = decode(model, b["input_ids"], b["attention_mask"], max_new_tokens=5)
    four_d = decode(model, b["input_ids"], four, max_new_tokens=5)
    assert torch.equal(two, four_d)
    # and a 4-D mask that hides a token changes what is generated: the mask is really read
    hidden = four.clone()
    hidden[0, 0, 2:, 1:3] = False
    assert not torch.equal(decode(model, b["input_ids"], hidden, max_new_tokens=5)[0], two[0])
