"""Gisting: the mask against a per-position reference, the instruction reaching the rest only
through the gists, gist caches against the full gist-masked prompt, what trains, and
save -> load of gist adapters and caches."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LLAMA_LIKE, make_model_dir
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import slimtune
from slimtune.data.batches import collate
from slimtune.data.gist import GistMask
from slimtune.errors import SlimtuneError
from slimtune.models.attention import model_mask

GIST = 63  # the gist token id in the tiny-vocabulary tests
CONDITIONS = ["gist", "pos_control", "neg_control"]


def reference_mask(ids: torch.Tensor, segments: torch.Tensor, condition: str) -> torch.Tensor:
    """may_attend(q, key), written out one position pair at a time."""
    B, T = ids.shape
    out = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for q in range(T):
            for k in range(q + 1):
                s = segments[b, q]
                if s < 0 or segments[b, k] != s:
                    continue
                gists = [j for j in range(T) if segments[b, j] == s and ids[b, j] == GIST]
                hidden = False
                if gists and condition == "gist":
                    hidden = q > max(gists) and k < min(gists)
                elif gists and condition == "neg_control":
                    hidden = q > max(gists) and k <= max(gists)
                out[b, 0, q, k] = not hidden
    return out


def gist_rows(k: int, n: int = 3, seed: int = 0) -> list[list[int]]:
    """Rows of instruction, k gists, input; the last row has no gist at all."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        instr = torch.randint(1, 50, (2 + i,), generator=g).tolist()
        inp = torch.randint(1, 50, (3 + 2 * i,), generator=g).tolist()
        rows.append(instr + [GIST] * k + inp)
    rows.append(torch.randint(1, 50, (4,), generator=g).tolist())
    return rows


@pytest.mark.parametrize("condition", CONDITIONS)
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("layout", ["right", "left", "packed"])
def test_the_gist_mask_equals_a_per_position_reference(condition, k, layout):
    rows = gist_rows(k)
    spec = GistMask(GIST, condition)
    if layout == "packed":
        packed = [rows[0] + rows[1], rows[2] + rows[3]]
        segs = [[0] * len(rows[0]) + [1] * len(rows[1]), [0] * len(rows[2]) + [1] * len(rows[3])]
        b = collate(packed, packed, pad_id=0, rows_segments=segs, gist=spec)
        segments = torch.full(b["input_ids"].shape, -1)
        for i, s in enumerate(segs):
            segments[i, : len(s)] = torch.tensor(s)
    else:
        b = collate(rows, rows, pad_id=0, side=layout, gist=spec)
        segments = torch.where(b["attention_mask"][:, 0].diagonal(dim1=-2, dim2=-1), 0, -1)
        real = torch.zeros_like(segments)
        for i, r in enumerate(rows):
            s = slice(0, len(r)) if layout == "right" else slice(real.shape[1] - len(r), real.shape[1])
            real[i, s] = 1
        assert torch.equal(segments >= 0, real.bool())  # padding is where collate put it
    expected = reference_mask(b["input_ids"], segments, condition)
    assert torch.equal(b["attention_mask"], expected)
    if condition != "pos_control":  # non-vacuous: the constraint hides something
        causal = collate(rows, rows, pad_id=0, side="right", gist=GistMask(GIST, "pos_control"))["attention_mask"]
        assert causal.sum() > collate(rows, rows, pad_id=0, side="right", gist=spec)["attention_mask"].sum()


def model_for(arch: str, impl: str, seed: int = 0):
    torch.manual_seed(seed)
    cls = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config),
           "mistral": (MistralForCausalLM, MistralConfig)}[arch]
    extra = {"sliding_window": None} if arch == "mistral" else {}
    return cls[0](cls[1](**LLAMA_LIKE, **extra, attn_implementation=impl)).eval()


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_the_instruction_reaches_the_rest_only_through_the_gists(arch, impl):
    """Swap the instruction's tokens but keep the gists' keys and values (patched in from the
    first prompt): every logit after the gists is the first prompt's. Without the patch they
    differ, so the instruction does matter, through the gists."""
    model = model_for(arch, impl)
    k = 2
    a = torch.tensor([[5, 6, 7, 8] + [GIST] * k + [9, 10, 11]])
    b = a.clone()
    b[0, :4] = torch.tensor([20, 21, 22, 23])
    spec = GistMask(GIST, "gist")

    def run(ids, patch=None):
        batch = collate(ids.tolist(), ids.tolist(), pad_id=0, gist=spec)
        mask = model_mask(batch["attention_mask"], model, torch.float32)
        captured, handles = {}, []
        for name, m in model.named_modules():
            if name.endswith(("k_proj", "v_proj")):
                def hook(mod, inp, out, name=name):
                    if patch is not None:
                        out = out.clone()
                        out[:, 4:4 + k] = patch[name]
                    captured[name] = out[:, 4:4 + k].clone()
                    return out
                handles.append(m.register_forward_hook(hook))
        try:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=batch["position_ids"]).logits
        finally:
            for h in handles:
                h.remove()
        return logits, captured

    la, gists_a = run(a)
    lb, _ = run(b)
    lb_patched, _ = run(b, patch=gists_a)
    after = slice(4 + k, None)
    assert not torch.allclose(la[:, after], lb[:, after], atol=1e-4)  # the instruction matters
    torch.testing.assert_close(lb_patched[:, after], la[:, after], atol=1e-5, rtol=0)  # only through the gists


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pos_control_is_causal_and_neg_control_sees_nothing_before(arch):
    """pos_control equals transformers' own causal forward; after the gists, neg_control equals
    running the tokens after the gists alone (at their positions)."""
    model = model_for(arch, "sdpa")
    ids = torch.tensor([[5, 6, 7, GIST, GIST, 9, 10, 11]])
    plain = model(input_ids=ids).logits
    pos = collate(ids.tolist(), ids.tolist(), 0, gist=GistMask(GIST, "pos_control"))
    ours = model(input_ids=ids, attention_mask=model_mask(pos["attention_mask"], model, torch.float32)).logits
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=0)
    neg = collate(ids.tolist(), ids.tolist(), 0, gist=GistMask(GIST, "neg_control"))
    ours = model(input_ids=ids, attention_mask=model_mask(neg["attention_mask"], model, torch.float32),
                 position_ids=neg["position_ids"]).logits
    alone = model(input_ids=ids[:, 5:], position_ids=torch.arange(5, 8)[None]).logits
    torch.testing.assert_close(ours[:, 5:], alone, atol=1e-5, rtol=0)


# ---- gist adapters and caches on a tiny model with a real tokenizer -------------------------

@pytest.fixture(scope="module", params=["llama", "qwen2"])
def gist_model_dir(request, tmp_path_factory):
    return str(make_model_dir(tmp_path_factory.mktemp(f"gist-{request.param}"), request.param))


def gist_model(directory, method: str = "lora", k: int = 2, seed: int = 3):
    """A tiny model with a perturbed adapter and a random gist row (nothing at identity)."""
    model = slimtune.load_model(directory).eval()
    tok = slimtune.load_tokenizer(directory)
    slimtune.add_adapter(model, slimtune.preset(method))
    slimtune.add_gist_tokens(model, slimtune.GistTokens(slimtune.add_gist_token(tok), k))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in slimtune.trainable_parameters(model).values():
            t.copy_(t + 0.1 * torch.randn(t.shape, generator=g) if t.dim() == 1 else 0.05 * torch.randn(t.shape, generator=g))
    return model, tok


def full_prompt_logits(model, tok, instruction: str, x: str) -> torch.Tensor:
    """Logits of the input part of the full gist-masked prompt (batch of one)."""
    from slimtune.data.templates import gist_prompt

    spec = slimtune.gist_tokens(model)
    before, after = gist_prompt(instruction, x, spec.num)
    head = tok(before)["input_ids"]
    ids = head + tok(after, add_special_tokens=False)["input_ids"]
    b = collate([ids], [ids], 0, gist=GistMask(spec.token_id, "gist"))
    out = model(input_ids=b["input_ids"], attention_mask=model_mask(b["attention_mask"], model, torch.float32),
                position_ids=b["position_ids"]).logits
    return out[0, len(head):]


@torch.no_grad()
def test_cached_gists_give_the_full_prompts_logits(gist_model_dir):
    """At batch size 1 and in a mixed batch of instructions (of different lengths) and inputs
    (of different lengths): every input token's logits equal the full gist-masked prompt's."""
    model, tok = gist_model(gist_model_dir)
    instructions = ["Say it in French.", "Write the word backwards, then count its letters slowly."]
    inputs = ["good morning", "a much longer input sentence with many words in it", "hi"]
    caches = {i: slimtune.compress_gist(model, tok, i) for i in instructions}
    pairs = [(instructions[0], inputs[0]), (instructions[1], inputs[1]), (instructions[0], inputs[2])]
    for batch in ([pairs[0]], pairs):
        kw = slimtune.gist_inputs(model, tok, [caches[i] for i, _ in batch], [x for _, x in batch])
        mask = kw["attention_mask"]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        P = kw["cache"].get_seq_length()
        out = model(input_ids=kw["input_ids"][:, P:], attention_mask=mask, position_ids=pos[:, P:],
                    cache=kw["cache"]).logits
        for row, (instr, x) in enumerate(batch):
            full = full_prompt_logits(model, tok, instr, x)
            n = full.shape[0]
            torch.testing.assert_close(out[row, -n:], full, atol=1e-5, rtol=0)
    # non-vacuous: another instruction's cache gives other logits
    other = full_prompt_logits(model, tok, instructions[1], inputs[0])
    assert not torch.allclose(full_prompt_logits(model, tok, instructions[0], inputs[0]), other, atol=1e-3)


@torch.no_grad()
def test_cached_generation_equals_full_prompt_generation_and_transformers_generate(gist_model_dir):
    from slimtune.data.rows import Example
    from slimtune.eval.generation import generate

    model, tok = gist_model(gist_model_dir)
    cache = slimtune.compress_gist(model, tok, "Name the colour.")
    inputs = ["the sky", "grass in spring time"]
    ours = slimtune.answer_with_gists(model, tok, [cache, cache], inputs, max_new_tokens=8)
    full = generate(model, tok, [Example([], "", "Name the colour.", x) for x in inputs], "gist", 8,
                    gist=slimtune.gist_tokens(model))
    assert ours == full
    kw = slimtune.gist_inputs(model, tok, [cache, cache], inputs)
    theirs = model.generate(**kw, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, top_k=None, top_p=None, temperature=None)
    texts = [t.strip() for t in tok.batch_decode(theirs[:, kw["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert texts == ours


def test_only_the_gist_row_and_the_adapter_train(tiny_dir, tmp_path):
    from test_train import cfg_for

    from slimtune.train.loop import setup, train_step

    run = setup(cfg_for(tiny_dir, tmp_path / "run", gist=2, lr_embedding=1e-1))
    assert run.cfg.template == "gist"
    model = run.model
    emb = model.get_input_embeddings().weight
    assert not emb.requires_grad
    groups = {g["group"]: g["params"] for g in run.opt.param_groups}
    assert [p.shape for p in groups["embedding"]] == [(1, emb.shape[1])]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gist_id = slimtune.gist_tokens(model).token_id
    torch.testing.assert_close(emb[gist_id], emb[:gist_id].mean(0))  # the base's row: the mean
    train_step(run, 0)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trained and any("gist_embedding" in n for n in changed)  # only trained tensors moved
    assert any(n.endswith(".B") for n in changed)  # (A waits for B: LoRA's B starts at 0)
    assert trained == {n for n in trained if "adapters." in n or "gist_embedding" in n}
    assert all(s["exp_avg"].numel() < emb.numel() for s in run.opt.state.values())  # no state of the matrix
    # the batches carry the gist mask
    b = run.train.rows([0])
    assert b["gist"] == GistMask(gist_id, "gist")


def test_a_gist_adapter_survives_save_and_load(tiny_dir, tmp_path):
    from test_train import cfg_for

    out = tmp_path / "run"
    slimtune.run_training(cfg_for(tiny_dir, out, gist=1, steps=2))
    model, tok = slimtune.load_model(tiny_dir).eval(), slimtune.load_tokenizer(tiny_dir)
    slimtune.load_adapter(model, out / "adapter", tokenizer=tok)
    spec = slimtune.gist_tokens(model)
    assert spec == slimtune.GistTokens(tok.convert_tokens_to_ids("<GIST>"), 1)
    saved = slimtune.trainable_parameters(model)
    from safetensors.torch import load_file

    on_disk = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert set(on_disk) == set(saved) and all(torch.equal(on_disk[k], saved[k]) for k in saved)
    # the loaded model computes with the trained row
    ids = torch.tensor([[3, 4, spec.token_id, 5]])
    with torch.no_grad():
        with_row = model(input_ids=ids).logits
        slimtune.gist_tokens(model)  # unchanged
        root = slimtune.adapters.inject.root(model)
        root.gist_embedding.mul_(0)
        assert not torch.allclose(model(input_ids=ids).logits, with_row)


def test_a_gist_cache_survives_save_and_load_and_refuses_another_adapter(gist_model_dir, tmp_path):
    model, tok = gist_model(gist_model_dir)
    cache = slimtune.compress_gist(model, tok, "Answer in one word.")
    assert cache.num == 2 and cache.instruction_tokens > 2
    path = slimtune.save_gist_cache(cache, tmp_path / "c.safetensors")
    from slimtune.recipes.gist import identity

    back = slimtune.load_gist_cache(path, identity(model))
    assert all(torch.equal(x, y) for x, y in zip(back.keys + back.values, cache.keys + cache.values))
    assert back.instruction == cache.instruction and back.instruction_tokens == cache.instruction_tokens
    other, _ = gist_model(gist_model_dir, seed=4)  # same base, another adapter
    with pytest.raises(SlimtuneError, match="adapter"):
        slimtune.load_gist_cache(path, identity(other))
    with pytest.raises(SlimtuneError, match="adapter"):
        slimtune.gist_inputs(other, tok, [back], ["x"])


@pytest.mark.parametrize("data, match", [({"gist": 1, "template": "alpaca"}, "only the gist template"),
                                         ({"gist": 1, "gist_condition": "both"}, "not a gist condition"),
                                         ({"gist": 100}, "k gist tokens must be"),
                                         ({"gist": -1}, "k gist tokens must be"),
                                         ({"template": "gist"}, "none are added")])
def test_bad_gist_settings_are_refused(data, match):
    from slimtune.train.config import train_config

    with pytest.raises(SlimtuneError, match=match):
        train_config(data)


def test_the_gist_template_needs_a_gist_adapter(tiny_dir):
    from slimtune.recipes.generate import gist_template

    model = slimtune.add_adapter(slimtune.load_model(tiny_dir), slimtune.preset("lora"))
    with pytest.raises(SlimtuneError, match="not trained with gist tokens"):
        gist_template(model, "gist")
    with pytest.raises(SlimtuneError, match="not trained with gist tokens"):
        slimtune.compress_gist(model, slimtune.load_tokenizer(tiny_dir), "x")


def test_gpt2_gist_caches_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from slimtune.eval.gist_cache import compress

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64))
    with pytest.raises(SlimtuneError, match="rotary"):
        compress(model, None, slimtune.GistTokens(63), "x", {})


def test_the_gist_commands_end_to_end(tiny_dir, tmp_path, capsys):
    """train --gist, gist compress (factor and bytes printed), generate --gist in a batch, and a
    cache refused by another adapter, all through the command line."""
    from slimtune.cli.main import main

    run = tmp_path / "run"
    assert main(["train", "--model", tiny_dir, "--gist", "2", "--steps", "2", "--demo_rows", "24", "--batch_size", "4",
                 "--eval_generate", "0", "--progress", "false", "--out", str(run)]) == 0
    cache = tmp_path / "c.safetensors"
    assert main(["gist", "compress", "--model", tiny_dir, "--adapter", str(run / "adapter"), "--instruction",
                 "Sort the numbers in ascending order.", "--out", str(cache), "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    assert "2 gist token(s), compression" in said and "bytes fewer" in said
    assert main(["generate", "--model", tiny_dir, "--adapter", str(run / "adapter"), "--gist", str(cache),
                 "--input", "3, 1, 2", "--input", "9, 7", "--max_new_tokens", "4", "--jsonl", "--device", "cpu"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [x["input"] for x in lines] == ["3, 1, 2", "9, 7"]
    other = tmp_path / "other"
    model = slimtune.load_model(tiny_dir)
    tok = slimtune.load_tokenizer(tiny_dir)
    slimtune.add_adapter(model, slimtune.preset("lora"))
    slimtune.add_gist_tokens(model, slimtune.GistTokens(slimtune.add_gist_token(tok), 2))
    slimtune.save_adapter(model, other)
    assert main(["generate", "--model", tiny_dir, "--adapter", str(other), "--gist", str(cache), "--input", "x",
                 "--device", "cpu"]) == 2
    assert "made with another adapter" in capsys.readouterr().err
    assert main(["generate", "--model", tiny_dir, "--input", "x"]) == 2  # --input without --gist


@torch.no_grad()
def test_a_gist_adapter_merges_into_a_plain_transformers_model(tiny_dir, tmp_path):
    """export --format merged: the gist row goes into the embedding, the tokenizer gets <GIST>,
    and plain transformers computes what the adapter does (under the same gist mask)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimtune.recipes.export import run_export

    model, tok = gist_model(tiny_dir, k=1)
    slimtune.save_adapter(model, tmp_path / "a")
    with pytest.raises(SlimtuneError, match="gist"):
        run_export(tiny_dir, str(tmp_path / "a"), str(tmp_path / "p"), "peft-lora")
    run_export(tiny_dir, str(tmp_path / "a"), str(tmp_path / "m"), "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    plain_tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    gid = plain_tok.convert_tokens_to_ids("<GIST>")
    assert gid == slimtune.gist_tokens(model).token_id
    ids = plain_tok("Instruction: sort\n<GIST>\nInput: 3 1\nOutput:")["input_ids"]
    b = collate([ids], [ids], 0, gist=GistMask(gid, "gist"))
    kw = dict(input_ids=b["input_ids"], position_ids=b["position_ids"])
    ours = model(attention_mask=model_mask(b["attention_mask"], model, torch.float32), **kw).logits
    theirs = plain(attention_mask=model_mask(b["attention_mask"], plain, torch.float32), **kw).logits
    torch.testing.assert_close(theirs[..., :gid], ours[..., :gid], atol=1e-5, rtol=0)


@torch.no_grad()
def test_caches_of_different_k_share_a_mixed_adapter_batch(gist_model_dir):
    """docs/gisting.md: caches of different k go in one batch, each row after its own cache, when
    the rows go through their own adapters (the server's batches: batch_after_gists under
    adapter_rows). gist_inputs serves one adapter, whose caches all have its k, and refuses
    another adapter's cache."""
    from slimtune.eval.gist_cache import batch_after_gists

    model = slimtune.load_model(gist_model_dir).eval()
    tok = slimtune.load_tokenizer(gist_model_dir)
    token = slimtune.add_gist_token(tok)
    g = torch.Generator().manual_seed(5)
    for name, k in (("one", 1), ("three", 3)):
        slimtune.add_adapter(model, slimtune.preset("lora"), name=name)
        slimtune.add_gist_tokens(model, slimtune.GistTokens(token, k), name=name)
        for t in slimtune.trainable_parameters(model, name).values():
            t.copy_(0.05 * torch.randn(t.shape, generator=g))
    caches, fulls = {}, {}
    jobs = [("one", "Say it in French.", "good morning"), ("three", "Count the letters.", "a longer input here")]
    for name, instruction, x in jobs:
        slimtune.set_active_adapter(model, name)
        caches[name] = slimtune.compress_gist(model, tok, instruction)
        fulls[name] = full_prompt_logits(model, tok, instruction, x)
    assert caches["one"].num == 1 and caches["three"].num == 3
    with pytest.raises(SlimtuneError, match="made with another"):
        slimtune.gist_inputs(model, tok, [caches["one"], caches["three"]], ["a", "b"])
    from slimtune.data.templates import gist_prompt

    rows = [tok(gist_prompt("", x, 1)[1], add_special_tokens=False)["input_ids"] for _, _, x in jobs]
    kw = batch_after_gists(model, [caches["one"], caches["three"]], rows, tok.pad_token_id)
    mask = kw["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    P = kw["cache"].get_seq_length()
    assert P == 3
    with slimtune.adapter_rows(model, ["one", "three"]):
        out = model(input_ids=kw["input_ids"][:, P:], attention_mask=mask, position_ids=pos[:, P:],
                    cache=kw["cache"]).logits
    for row, (name, _, _) in enumerate(jobs):
        n = fulls[name].shape[0]
        torch.testing.assert_close(out[row, -n:], fulls[name], atol=1e-5, rtol=0)
    assert not torch.allclose(fulls["one"][-1], fulls["three"][-1], atol=1e-3)


def test_a_trained_gist_carries_the_instruction_where_neg_control_cannot(tmp_path):
    """Two tasks that differ only by their instruction ("Answer yes." / "Answer no.") on the same
    inputs. Trained for a handful of steps, the gist model's held-out loss beats the negative
    control's, which cannot know the task: the instruction reaches the answer through the gist.
    Were the gist mask the negative control's, the two would train alike and this would fail."""
    import random

    from conftest import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import LLAMA_LIKE

    tok = make_tokenizer(tmp_path / "model")
    torch.manual_seed(0)  # weights large enough (std 0.2) for signals to cross two attention hops early
    config = LlamaConfig(**dict(LLAMA_LIKE, vocab_size=len(tok), max_position_embeddings=128, initializer_range=0.2))
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    words = ["river", "garden", "silver", "planet", "window", "coffee", "market", "pocket", "yellow", "bridge"]

    def rows(n: int, seed: int, path):
        r = random.Random(seed)
        data = []
        for _ in range(n):
            task = r.randrange(2)
            data.append({"instruction": ["Answer yes.", "Answer no."][task], "input": " ".join(r.sample(words, 3)),
                         "output": ["yes", "no"][task]})
        path.write_text("".join(json.dumps(x) + "\n" for x in data))
        return str(path)

    train, val = rows(400, 0, tmp_path / "train.jsonl"), rows(40, 1, tmp_path / "val.jsonl")
    loss = {}
    for condition in ("gist", "neg_control"):
        s = slimtune.run_training(slimtune.TrainConfig(
            model=str(tmp_path / "model"), method="lora", data=[train], val_data=[val], gist=1, gist_condition=condition,
            steps=60, batch_size=8, lr=1e-2, lr_embedding=1e-2, warmup_steps=0, max_len=64, eval_generate=0,
            eval_every=0, save_every=0, progress=False, out=str(tmp_path / condition), device="cpu"))
        loss[condition] = s["after"]["loss"]
    assert loss["gist"] < loss["neg_control"] - 0.15, loss
